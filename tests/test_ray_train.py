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
