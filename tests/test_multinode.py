"""Multi-node on one machine: a head and two worker nodes (ray.cluster_utils.Cluster), the
ledger on the tests' S3 server. Each scenario runs in a subprocess with a cluster of its own,
so the session's embedded Ray is untouched."""

from __future__ import annotations

import pytest
from multinode import run_cluster_script

_SERVICE_NODE_LOSS = r"""
import json, sys, time
import aspkd_ray  # first: it sets Ray's auth mode before ray is imported
import numpy as np
import ray
import torch
from ray.cluster_utils import Cluster
from ray._private import state

from aspkd_ray.config import load
from aspkd_ray.errors import UserError
from aspkd_ray.models import create_model, save_checkpoint
from aspkd_ray.teacher import Ledger, connect_teacher_service

out, uri = sys.argv[1], sys.argv[2]
# The head runs no work (0 CPUs), so the service lands on a worker node that can be removed.
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
cluster.wait_for_nodes()
ray.init(address=cluster.address, namespace="multinode")
torch.manual_seed(0)
ckpt = save_checkpoint(create_model("digits_cnn", num_classes=10, in_chans=1, image_size=28),
                       f"{out}/victim")
# teacher_node=any: on a worker node, so that its node can be removed (the default, head,
# would keep it on the head, which outlives every worker node).
base = [f"output_dir={out}", f"victim.checkpoint={ckpt}", f"ray.address={cluster.address}",
        "ray.namespace=multinode", "ray.teacher_node=any"]
result = {}
try:  # a ledger on one node's disk cannot serve three nodes: refused up front
    connect_teacher_service(load(None, base, None), 10, budget=12)
except UserError as exc:
    result["local_refused"] = str(exc)
client = connect_teacher_service(load(None, base + [f"budget.ledger={uri}"], None), 10,
                                 budget=12)
imgs = np.random.default_rng(0).integers(0, 256, (16, 28, 28, 1), dtype=np.uint8)
ids, cls = [f"s{i}" for i in range(16)], np.arange(16) % 10
first = client.buy(ids[:8], cls[:8], imgs[:8])
actor_id = client._handle._actor_id.hex()
node_id = state.actors(actor_id=actor_id)["Address"]["NodeID"]
victim_node = next(n for n in nodes if n.node_id == node_id)
t0 = time.monotonic()
cluster.remove_node(victim_node)                     # the service's node is gone
again = client.buy(ids[:8], cls[:8], imgs[:8])       # answered by the restarted service
result["recovery_s"] = time.monotonic() - t0
result["moved"] = state.actors(actor_id=actor_id)["Address"]["NodeID"] != node_id
result["same_answers"] = bool(np.array_equal(first, again))
try:
    client.buy(ids[8:16], cls[8:16], imgs[8:16])     # 4 left of 12: the rest is refused
except Exception as exc:
    result["refused"] = type(exc).__name__
    result["answered_after"] = len(exc.answered_ids)
status = client.status()
result.update(spent=status["spent"], left=status["left"],
              unanswered=len(status["reserved_unanswered"]))
client.shutdown()
# The default placement: the head node, even with 0 CPUs there.
head = load(None, [f"output_dir={out}/head", f"victim.checkpoint={ckpt}",
                   f"ray.address={cluster.address}", "ray.namespace=multinode",
                   "ray.teacher_service=on-head", f"budget.ledger={uri}-head"], None)
on_head = connect_teacher_service(head, 10, budget=4)
result["head_placed"] = state.actors(actor_id=on_head._handle._actor_id.hex())[
    "Address"]["NodeID"] == cluster.head_node.node_id
on_head.shutdown()
rows = Ledger(uri, create=False).charge_rows().to_pydict()
charged = [i for i, c in zip(rows["id"], rows["charge"]) if c]
result.update(charge_rows=len(charged), distinct=len(set(charged)))
print("RESULT " + json.dumps(result))
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_teacher_service_node_removed_mid_attack(s3_root, tmp_path):
    r = run_cluster_script(_SERVICE_NODE_LOSS, str(tmp_path), f"{s3_root}/ledger")
    assert "local disk, but the Ray cluster has 3 nodes" in r["local_refused"]
    assert r["moved"] and r["same_answers"] and r["head_placed"]
    assert (r["refused"], r["answered_after"]) == ("BudgetExhausted", 4)
    # Budget exact, nothing lost, nothing charged twice.
    assert (r["spent"], r["left"], r["unanswered"]) == (12, 0, 0)
    assert r["charge_rows"] == r["distinct"] == 12
    print(f"service recovered on another node in {r['recovery_s']:.1f} s")


_SERVICE_NODE_LOSS_IN_ATTACK = r"""
import json, sys, threading, time
import aspkd_ray  # first: it sets Ray's auth mode before ray is imported
import numpy as np
import ray
import torch
from ray._private import state
from ray.cluster_utils import Cluster

from aspkd_ray.aspkd.rounds import ProxyPool, RoundSettings
from aspkd_ray.config import load
from aspkd_ray.models import create_model, save_checkpoint
from aspkd_ray.teacher import Ledger, connect_teacher_service
from aspkd_ray.train.attack import AttackJob, load_round, run_attack

out, root = sys.argv[1], sys.argv[2]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
cluster.wait_for_nodes()
ray.init(address=cluster.address, namespace="multinode-attack")
torch.manual_seed(0)
ckpt = save_checkpoint(create_model("digits_cnn", num_classes=10, in_chans=1, image_size=28),
                       f"{out}/victim")
ledger = f"{root}/ledger"
cfg = load(None, [f"output_dir={out}", f"victim.checkpoint={ckpt}", f"budget.ledger={ledger}",
                  f"ray.address={cluster.address}", "ray.namespace=multinode-attack",
                  "ray.teacher_node=any", "ray.num_workers=1", "ray.cpus_per_worker=0.5",
                  "student.architecture=digits_cnn_small", "training.max_epochs=4",
                  "training.batch_size=16"], None)
n, g = 150, torch.Generator().manual_seed(0)
pool = ProxyPool(x=torch.rand(n, 1, 28, 28, generator=g), classes=np.arange(n) % 10,
                 x_val=torch.rand(10, 1, 28, 28, generator=g), classes_val=np.arange(10))
settings = RoundSettings.from_config(cfg, 10, 30)
images = np.random.default_rng(0).integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
job = AttackJob(cfg=cfg, settings=settings, pool=ray.put(pool), input_shape=(pool.x.shape[-1], pool.x.shape[1]),
                ids=[f"p{i}" for i in range(n)], classes=pool.classes, train=np.arange(n),
                val=np.zeros(0, np.int64), images_ref=ray.put(images), num_classes=10,
                budget_total=30, ledger_uri=ledger)
service = connect_teacher_service(cfg, 10, budget=30, ledger_uri=ledger)
actor_id = service._handle._actor_id.hex()
result = {}


def remove_the_services_node():
    # After round 1 bought its labels, before the attack ends: the service's node goes.
    while Ledger(ledger, create=False).status()["spent"] < 10:
        time.sleep(0.1)
    node_id = state.actors(actor_id=actor_id)["Address"]["NodeID"]
    result["spent_at_removal"] = Ledger(ledger, create=False).status()["spent"]
    result["removed_at"] = time.monotonic()
    cluster.remove_node(next(nd for nd in nodes if nd.node_id == node_id))
    result["removed_node"] = node_id


watcher = threading.Thread(target=remove_the_services_node, daemon=True)
watcher.start()
rounds = run_attack(job, f"{root}/ray_train")
result["finished_at"] = time.monotonic()
watcher.join(5)
result["rounds"] = [load_round(c)[0].round for c, _ in rounds]
result["moved"] = state.actors(actor_id=actor_id)["Address"]["NodeID"] != result.get("removed_node")
status = service.status()
result.update(spent=status["spent"], left=status["left"],
              unanswered=len(status["reserved_unanswered"]))
rows = Ledger(ledger, create=False).charge_rows().to_pydict()
charged = [i for i, c in zip(rows["id"], rows["charge"]) if c]
result.update(charge_rows=len(charged), distinct=len(set(charged)))
service.shutdown()
print("RESULT " + json.dumps(result))
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_teacher_service_node_removed_during_a_ray_train_attack(s3_root, tmp_path):
    r = run_cluster_script(_SERVICE_NODE_LOSS_IN_ATTACK, str(tmp_path), s3_root)
    assert "removed_node" in r and r["removed_at"] < r["finished_at"], r
    assert 10 <= r["spent_at_removal"] < 30 and r["moved"]
    assert r["rounds"] == [1, 2, 3]
    # The attack finished: budget exact, 0 labels lost, 0 charged twice.
    assert (r["spent"], r["left"], r["unanswered"]) == (30, 0, 0)
    assert r["charge_rows"] == r["distinct"] == 30
    print(f"node removed at {r['spent_at_removal']} spent; attack finished "
          f"{r['finished_at'] - r['removed_at']:.1f} s later")
