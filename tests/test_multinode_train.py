"""Multi-node Ray Train on one machine: a head with no CPU and two 1-CPU worker nodes
(ray.cluster_utils.Cluster), checkpoints on the tests' S3 server. Runs in a subprocess with a
cluster of its own, so the session's embedded Ray is untouched."""

from __future__ import annotations

import pytest
from multinode import run_cluster_script

_TWO_NODE_ATTACK = r"""
import json, sys, time
import aspkd_ray  # first: it sets Ray's auth mode before ray is imported
import numpy as np
import ray
import torch
from ray.cluster_utils import Cluster

from aspkd_ray.aspkd.rounds import ProxyPool, RoundSettings
from aspkd_ray.config import load
from aspkd_ray.models import create_model, save_checkpoint
from aspkd_ray.runtime import plan_workers
from aspkd_ray.teacher import connect_teacher_service
from aspkd_ray.train.attack import AttackJob, load_round, run_attack

out, root = sys.argv[1], sys.argv[2]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
cluster.wait_for_nodes()
ray.init(address=cluster.address, namespace="multinode-train")
torch.manual_seed(0)
ckpt = save_checkpoint(create_model("digits_cnn", num_classes=10, in_chans=1, image_size=28),
                       f"{out}/victim")
# Default resources: no ray.cpus_per_worker. The teacher service stays on the head (no CPU).
cfg = load(None, [f"output_dir={out}", f"victim.checkpoint={ckpt}", f"budget.ledger={root}/ledger",
                  f"ray.address={cluster.address}", "ray.namespace=multinode-train",
                  "ray.num_workers=2", "student.architecture=digits_cnn_small",
                  "training.max_epochs=2", "training.batch_size=16", "aspkd.rounds=2",
                  "aspkd.self_paced=false"], None)
plan = plan_workers(requested=2, nodes=None)
n, g = 60, torch.Generator().manual_seed(0)
pool = ProxyPool(x=torch.rand(n, 1, 28, 28, generator=g), classes=np.arange(n) % 10,
                 x_val=torch.rand(10, 1, 28, 28, generator=g), classes_val=np.arange(10))
settings = RoundSettings.from_config(cfg, 10, 20)
images = np.random.default_rng(0).integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
job = AttackJob(cfg=cfg, settings=settings, pool=ray.put(pool), input_shape=(pool.x.shape[-1], pool.x.shape[1]),
                ids=[f"p{i}" for i in range(n)], classes=pool.classes, train=np.arange(n),
                val=np.zeros(0, np.int64), images_ref=ray.put(images), num_classes=10,
                budget_total=20, ledger_uri=f"{root}/ledger")
service = connect_teacher_service(cfg, 10, budget=20, ledger_uri=job.ledger_uri)
t0 = time.monotonic()
rounds = run_attack(job, f"{root}/ray_train")
result = {"attack_s": time.monotonic() - t0, "plan_cpus": plan.cpus,
          "worker_nodes": sorted(nd.node_id for nd in nodes), "rounds": []}
for checkpoint, metrics in rounds:
    state, weights = load_round(checkpoint)  # from the bucket, never a worker's disk
    result["rounds"].append({
        "round": state.round, "bought": int(len(state.bought_idx)),
        "path": checkpoint.path, "fs": checkpoint.filesystem.type_name,
        "workers": metrics["workers"],
        "params": sum(float(v.double().sum()) for v in weights.values())})
result["spent"] = service.status()["spent"]
service.shutdown()
print("RESULT " + json.dumps(result))
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_two_train_workers_on_two_nodes_train_one_student(s3_root, tmp_path):
    r = run_cluster_script(_TWO_NODE_ATTACK, str(tmp_path), s3_root)
    # Sized from the 1-CPU nodes, not the cluster's 2 CPUs in total.
    assert 0 < r["plan_cpus"] <= 1.0
    bucket = s3_root[len("s3://"):].split("/")[0]
    assert [x["round"] for x in r["rounds"]] == [1, 2]
    assert [x["bought"] for x in r["rounds"]] == [10, 20] and r["spent"] == 20
    for x in r["rounds"]:
        # Every round's checkpoint was read from the bucket.
        assert x["fs"] == "s3" and x["path"].startswith(f"{bucket}/run/ray_train/attack/")
        ranks = {w["rank"]: w for w in x["workers"]}
        assert sorted(ranks) == [0, 1]
        # One rank on each worker node (the head has no CPU for either).
        assert sorted(w["node_id"] for w in ranks.values()) == r["worker_nodes"]
        # One student: both ranks hold the same weights after every round.
        assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    assert r["rounds"][0]["params"] != r["rounds"][1]["params"], "round 2 did not train"
    print(f"two-node attack in {r['attack_s']:.1f} s")
