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
