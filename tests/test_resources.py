"""Worker sizing from each node's resources (pure: fake `ray.nodes()`-like inputs)."""

from __future__ import annotations

import pytest

from aspkd_ray.errors import UserError
from aspkd_ray.runtime.resources import WorkerPlan, check_placeable, plan_workers


def _nodes(*cpus: float, gpus: tuple[float, ...] = ()) -> list[dict[str, float]]:
    gpus = gpus or (0.0,) * len(cpus)
    return [{"CPU": c, **({"GPU": g} if g else {}), "memory": 1e9}
            for c, g in zip(cpus, gpus, strict=True)]


@pytest.mark.parametrize("head, workers, num", [(0, 2, 2), (1, 2, 2), (1, 2, None),
                                                (0, 3, 3), (0, 2, 4), (1, 4, 3)])
def test_default_cpu_workers_fit_one_cpu_nodes(head, workers, num):
    # The bug: three 1-CPU nodes add up to 3 CPUs, and two workers of 1.25 CPU fit nowhere.
    nodes = _nodes(*([head] if head else [0.0]), *([1.0] * workers))
    plan = plan_workers(requested=num, nodes=nodes)
    assert plan.gpus == 0 and plan.num == (num or 1)
    assert 0 < plan.cpus <= 1.0
    check_placeable(plan, nodes)  # the default always fits


def test_single_node_default_is_unchanged():
    # One 2-CPU node (the embedded Ray): one worker keeps all but the 0.5 reserved.
    assert plan_workers(nodes=_nodes(2.0)) == WorkerPlan(1, 1.5, 0.0)
    assert plan_workers(requested=2, nodes=_nodes(2.0)) == WorkerPlan(2, 0.75, 0.0)
    # `resources` alone still means one node holding them (generation's plan_pool).
    assert plan_workers(requested=4, resources={"CPU": 64.0}).cpus == 15.87


def test_unequal_nodes_never_exceed_what_one_node_has():
    nodes = _nodes(8.0, 1.0, 1.0)
    plan = plan_workers(requested=3, nodes=nodes)
    assert plan.cpus <= 8.0 / 3 and plan.cpus * 3 <= 10.0 - 0.5
    check_placeable(plan, nodes)
    assert plan_workers(requested=1, nodes=nodes).cpus == 8.0  # largest node, one worker


def test_gpu_workers_take_one_gpu_and_a_share_of_their_node():
    nodes = _nodes(0.0, 1.0, 1.0, gpus=(0.0, 1.0, 1.0))  # two 1-GPU, 1-CPU nodes
    plan = plan_workers(nodes=nodes)
    assert (plan.num, plan.gpus) == (2, 1.0) and 0 < plan.cpus <= 1.0
    check_placeable(plan, nodes)
    big = _nodes(4.0, 16.0, gpus=(0.0, 4.0))
    assert plan_workers(nodes=big) == WorkerPlan(4, 4.0, 1.0)
    assert plan_workers(use_gpu=False, nodes=big).gpus == 0


def test_explicit_keys_win_and_the_check_names_them():
    nodes = _nodes(0.0, 1.0, 1.0)
    plan = plan_workers(requested=2, cpus_per_worker=1.25, nodes=nodes)
    assert plan == WorkerPlan(2, 1.25, 0.0)
    with pytest.raises(UserError) as err:
        check_placeable(plan, nodes)
    msg = str(err.value)
    assert "2 worker(s) of 1.25 CPU each" in msg and "holds none" in msg
    assert "3 node(s): 1 x 0 CPU, 2 x 1 CPU" in msg
    assert "ray.num_workers" in msg and "ray.cpus_per_worker" in msg
    assert "ray.autoscale=true" in msg
    # Together too: each fits a node, three do not fit two nodes.
    with pytest.raises(UserError, match="holds only 2"):
        check_placeable(plan_workers(requested=3, cpus_per_worker=0.6, nodes=nodes), nodes)
    # An autoscaling cluster waits for nodes instead.
    check_placeable(plan, nodes, autoscale=True)


def test_gpu_asked_but_absent():
    nodes = _nodes(0.0, 1.0)
    with pytest.raises(UserError, match=r"ray.use_gpu=true but no node .* ray.autoscale=true"):
        plan_workers(use_gpu=True, nodes=nodes)
    # The cluster adds GPU nodes on demand: ask for GPUs, never CPU-only work.
    plan = plan_workers(use_gpu=True, nodes=nodes, autoscale=True)
    assert plan == WorkerPlan(1, 1.0, 1.0)
    with pytest.raises(UserError, match="1 worker.* and 1 GPU each"):
        check_placeable(plan, nodes)
    check_placeable(plan, nodes, autoscale=True)  # waits, with a log line
    # use_gpu unset: GPUs when the autoscaler's node types have them, else CPUs.
    assert plan_workers(nodes=nodes, autoscale=True, max_resources={"GPU": 8}).use_gpu
    assert not plan_workers(nodes=nodes, autoscale=True, max_resources={"CPU": 8}).use_gpu
    assert not plan_workers(nodes=nodes, max_resources={"GPU": 8}).use_gpu
