"""Ray Train: two CPU workers (gloo) train one model together."""

import json
import sys

import pytest
import torch

from aspkd_ray.aspkd.distill import fit
from aspkd_ray.config import TrainingConfig
from aspkd_ray.models import create_model
from aspkd_ray.train.comm import TorchDistComm


def _two_worker_loop(config):
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(0)
    model = create_model("digits_cnn_small", num_classes=10, in_chans=1, image_size=28)
    init = sum(float(p.double().sum()) for p in model.parameters())
    model = ray.train.torch.prepare_model(model)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(96, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (96,), generator=g)
    seen = []
    cfg = TrainingConfig(max_epochs=2, batch_size=16, lr=1e-2, augment=False,
                         early_stopping="none")
    res = fit(model, x, y, cfg, rank=rank, world_size=world,
              on_epoch=lambda row: seen.append(row["loss"]))
    # Rank 0 decides, every rank receives the same decision.
    decision = TorchDistComm(rank, world).broadcast(["rank0-decision"] if rank == 0 else None)
    params = sum(float(p.double().sum()) for p in model.parameters())
    with open(f"{config['out']}/rank{rank}.json", "w") as fh:
        json.dump({"rank": rank, "world": world, "params": params, "init": init,
                   "losses": seen, "decision": decision, "epochs": res.epochs_run}, fh)


@pytest.mark.timeout(240)
def test_two_cpu_workers_share_one_model(ray_session, tmp_path):
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    trainer = TorchTrainer(
        _two_worker_loop, train_loop_config={"out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False,
                                     resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="ddp-check", storage_path=str(tmp_path / "storage")))
    result = trainer.fit()
    assert result.error is None
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["world"] == r1["world"] == 2
    assert r0["init"] == r1["init"]
    assert r0["params"] != r0["init"], "the model did not train"
    # Different shards of data on each rank, yet identical weights: gradients were shared.
    assert r0["losses"] != r1["losses"]
    assert r0["params"] == pytest.approx(r1["params"], rel=1e-6, abs=1e-6)
    assert r0["decision"] == r1["decision"] == ["rank0-decision"]


# ---- attack errors are not retried ------------------------------------------------------

class CountingVictim:
    """A loopback MLflow endpoint: answers 400 ("broken") or uniform probabilities, and
    counts the requests it gets (one per attempt that asks the victim)."""

    def __init__(self, broken: bool) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests = 0
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                srv.requests += 1
                n = len(body["inputs"])
                code, answer = ((400, {"error": "model is broken"}) if broken else
                                (200, {"predictions": [[0.1] * 10] * n}))
                data = json.dumps(answer).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _attack_job(tmp_path, url: str, output: str, workers: int):
    import uuid
    from dataclasses import replace

    import numpy as np
    import ray

    from aspkd_ray.aspkd.rounds import ProxyPool, RoundSettings
    from aspkd_ray.config import load
    from aspkd_ray.train.attack import AttackJob

    cfg = load(None, [f"output_dir={tmp_path}", f"ray.teacher_service=t-{uuid.uuid4().hex[:8]}",
                      "ray.namespace=aspkd-train-tests", f"victim.endpoint={url}",
                      "victim.max_retries=0", f"ray.num_workers={workers}",
                      "ray.cpus_per_worker=0.5", "student.architecture=digits_cnn_small",
                      "training.max_epochs=1"], None)
    n, g = 40, torch.Generator().manual_seed(0)
    pool = ProxyPool(x=torch.rand(n, 1, 28, 28, generator=g), classes=np.arange(n) % 10,
                     x_val=torch.rand(10, 1, 28, 28, generator=g), classes_val=np.arange(10))
    # output="hard" against a soft teacher: the attack code raises a TypeError after buying.
    settings = replace(RoundSettings.from_config(cfg, 10, 20), rounds=1, output=output,
                       aspkd=replace(cfg.aspkd, selection="random", self_paced=False))
    images = np.random.default_rng(0).integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
    return AttackJob(cfg=cfg, settings=settings, pool=ray.put(pool), input_shape=(pool.x.shape[-1], pool.x.shape[1]),
                     ids=[f"p{i}" for i in range(n)], classes=pool.classes, train=np.arange(n),
                     val=np.zeros(0, np.int64), images_ref=ray.put(images),
                     num_classes=10, budget_total=20, ledger_uri=str(tmp_path / "ledger"))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("failure, workers", [("victim", 1), ("attack", 1), ("victim", 2)])
def test_attack_errors_fail_at_once_with_the_original_exception(ray_session, tmp_path,
                                                                failure, workers):
    from aspkd_ray.teacher import VictimError, connect_teacher_service
    from aspkd_ray.train.attack import run_attack

    server = CountingVictim(broken=failure == "victim")
    job = _attack_job(tmp_path, server.url, "soft" if failure == "victim" else "hard",
                      workers)
    # Started here, so it outlives every attempt's workers and counts all their requests.
    service = connect_teacher_service(job.cfg, 10, budget=20, ledger_uri=job.ledger_uri)
    try:
        expected = (VictimError, "HTTP 400") if failure == "victim" else (
            TypeError, "hard-label teacher answers must be class ids")
        with pytest.raises(expected[0], match=expected[1]) as err:
            run_attack(job, tmp_path / "ray_train")
        assert type(err.value) is expected[0]
        if failure == "victim":
            assert len(err.value.unanswered_ids) == 20  # its attributes crossed too
        # One attempt: one buy reached the service (a retry would buy again, free or not).
        assert service.status()["service"]["requests"] == 1
        assert server.requests == 1
    finally:
        service.shutdown()
        server.close()


def test_machinery_failures_stay_retryable():
    import ray.exceptions

    from aspkd_ray.train.attack import _retryable

    assert _retryable(ray.exceptions.ActorDiedError())
    assert _retryable(ray.exceptions.NodeDiedError("node 1"))
    assert _retryable(torch.distributed.DistBackendError("peer closed the connection"))
    assert not _retryable(ValueError("bad value"))
    assert not _retryable(RuntimeError("shape mismatch"))
    task_error = ray.exceptions.RayTaskError("buy", "tb", ValueError("no"))
    assert not _retryable(task_error)


# ---- a worker group the nodes cannot hold fails at once ---------------------------------

@pytest.mark.timeout(120)
def test_unplaceable_worker_group_fails_within_seconds(ray_session, tmp_path):
    import time

    import ray

    from aspkd_ray.errors import UserError
    from aspkd_ray.train.attack import run_attack

    # Three 1-CPU workers on the session's one 2-CPU node: Ray Train would wait forever.
    job = _attack_job(tmp_path, "http://127.0.0.1:9", "soft", 3)
    job.cfg.ray.cpus_per_worker = 1.0
    nodes = len([n for n in ray.nodes() if n["Alive"]])
    t0 = time.monotonic()
    with pytest.raises(UserError) as err:
        run_attack(job, tmp_path / "ray_train")
    elapsed = time.monotonic() - t0
    msg = str(err.value)
    assert elapsed < 30, f"took {elapsed:.1f} s"
    assert "3 worker(s) of 1 CPU each" in msg and "holds only 2" in msg
    assert f"{nodes} node(s): 1 x 2 CPU" in msg
    assert "ray.num_workers" in msg and "ray.cpus_per_worker" in msg
    assert not (tmp_path / "ray_train" / "attack").exists()  # no Ray Train run started
