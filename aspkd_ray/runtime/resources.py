"""Size actor pools and worker groups from what each node has, never from constants.

On a 2-CPU machine two 1-CPU actors plus a Ray Data read task deadlock (measured), so CPU
work is given fractional requests that leave room for the rest of the pipeline. A worker or
actor lives on one node: a request is sized from the nodes (`ray.nodes()`), not from the
cluster's totals, since three 1-CPU nodes add up to 3 CPUs but hold no 1.25-CPU worker.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from aspkd_ray.errors import UserError

log = logging.getLogger(__name__)

_EPS = 1e-6  # Ray keeps resources in units of 1e-4; a sum of float shares may fall just short


@dataclass(frozen=True)
class WorkerPlan:
    num: int
    cpus: float
    gpus: float

    @property
    def use_gpu(self) -> bool:
        return self.gpus > 0


class ResourceError(UserError, ValueError):
    """The planned workers cannot run on this cluster (no GPU, or nowhere to place them)."""


def alive_nodes() -> list[dict[str, float]]:
    """Each live node's total resources, as Ray reports them (the head too, even with 0
    CPUs: it holds no worker, but counts in the messages)."""
    import ray

    return [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]


def autoscaler_max_resources() -> dict[str, float] | None:
    """The most an autoscaler may bring up (summed over its node types), or None when no
    autoscaler published a config (a fixed cluster, or an autoscaler that does not). Ray's
    private state API, as Ray Train and Ray Data use it: a hint only, never required."""
    try:
        from ray._private import state

        return state.state.get_max_resources_from_cluster_config() or None
    except (ImportError, AttributeError, RuntimeError, ConnectionError) as exc:
        # no such API in this Ray, or no GCS to ask: no hint, said in the debug log
        log.debug("no autoscaler limits from Ray (%s: %s)", type(exc).__name__, exc)
        return None


def _fit(nodes: list[dict[str, float]], cpus: float, gpus: float) -> int:
    """How many workers of (cpus, gpus) the nodes hold at most (all workers alike, so filling
    node by node is exact)."""
    count = 0
    for node in nodes:
        per = math.inf
        if cpus > 0:
            per = min(per, math.floor(node.get("CPU", 0.0) / cpus + _EPS))
        if gpus > 0:
            per = min(per, math.floor(node.get("GPU", 0.0) / gpus + _EPS))
        if per == math.inf:  # asks for nothing: any node holds any number
            return 1 << 30
        count += int(per)
    return count


def largest_fitting_cpus(limit: float, nodes: list[dict[str, float]], num: int) -> float:
    """The largest CPU request <= `limit` (2 decimals) with which `num` workers fit on the
    nodes: a node of c CPUs holds k workers of c/k, so those are the only sizes to try."""
    caps = {n.get("CPU", 0.0) for n in nodes if n.get("CPU", 0.0) > 0}  # node shapes
    if not caps:  # no CPU node yet (an autoscaler will add them): fit a 1-CPU node
        return min(limit, 1.0)
    sizes = {limit} | {c / k for c in caps for k in range(1, num + 1)}
    sizes = sorted({math.floor(x * 100 + _EPS) / 100 for x in sizes if x <= limit} - {0.0})
    # Fewer workers fit as the size grows: bisect for the largest size that holds `num`.
    lo, hi, best = 0, len(sizes) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if _fit(nodes, sizes[mid], 0.0) >= num:
            best, lo = sizes[mid], mid + 1
        else:
            hi = mid - 1
    return limit if best is None else best  # None: the placement check names the numbers


def plan_workers(*, requested: int | None = None, use_gpu: bool | None = None,
                 cpus_per_worker: float | None = None, reserve_cpus: float = 0.5,
                 resources: dict | None = None, nodes: list[dict] | None = None,
                 autoscale: bool = False, max_resources: dict | None = None) -> WorkerPlan:
    """How many workers, and what each asks for.

    `nodes`: each node's total resources (default: `ray.nodes()`); `resources` alone stands
    for one node holding them. GPUs present (and not refused): one worker per GPU, each with
    one GPU and a share of its node's CPUs (at most 4). Otherwise CPU workers share what is
    left after `reserve_cpus` (for drivers, Ray Data reads, the teacher service), and no
    worker asks for more CPUs than one node can give next to the others (a 1-CPU node holds
    a worker of the default size). Explicit `requested` and `cpus_per_worker` win;
    `check_placeable` then says whether they fit.

    `autoscale`: the cluster adds nodes on demand, so with `use_gpu=True` and no GPU node up
    yet the plan still asks for GPUs (and `use_gpu=None` does so when the autoscaler's
    `max_resources` include GPUs) instead of failing or planning CPU-only work.
    """
    if nodes is None:
        if resources is not None:
            nodes = [dict(resources)]
        else:
            nodes = alive_nodes()
            if autoscale and max_resources is None:
                max_resources = autoscaler_max_resources()
    total_cpu = sum(n.get("CPU", 0.0) for n in nodes)
    total_gpu = sum(n.get("GPU", 0.0) for n in nodes)
    gpu_nodes = [n for n in nodes if n.get("GPU", 0.0) >= 1]
    may_add_gpus = autoscale and float((max_resources or {}).get("GPU", 0) or 0) >= 1
    gpu = bool(gpu_nodes or may_add_gpus) if use_gpu is None else use_gpu
    if gpu and not gpu_nodes and not autoscale:
        raise ResourceError(
            f"ray.use_gpu=true but no node of the Ray cluster has a GPU ({_describe(nodes)}); "
            f"set ray.use_gpu=null (or false) to train on CPUs, connect to a GPU cluster, or, "
            f"if the cluster adds GPU nodes on demand, set ray.autoscale=true to ask for "
            f"them and wait.")
    free_cpu = max(total_cpu - reserve_cpus, 0.25)
    if gpu:
        num = requested or max(int(total_gpu), 1)
        if cpus_per_worker:
            return WorkerPlan(num, cpus_per_worker, 1.0)
        if not gpu_nodes:  # none up yet (autoscale): 1 CPU, which any GPU node has
            return WorkerPlan(num, 1.0, 1.0)
        per_gpu_node = min(n.get("CPU", 0.0) / math.floor(n["GPU"]) for n in gpu_nodes)
        cpus = max(min(free_cpu / num, 4.0, per_gpu_node), 0.25)
        return WorkerPlan(num, math.floor(cpus * 100 + _EPS) / 100, 1.0)
    num = requested or 1
    if cpus_per_worker:
        return WorkerPlan(num, cpus_per_worker, 0.0)
    share = max(math.floor(free_cpu / num * 100) / 100, 0.1)
    return WorkerPlan(num, largest_fitting_cpus(share, nodes, num), 0.0)


def _describe(nodes: list[dict[str, float]]) -> str:
    """'3 node(s): 1 x 0 CPU, 2 x 1 CPU' (alike nodes grouped: short on large clusters)."""
    from collections import Counter

    shapes = Counter((n.get("CPU", 0.0), n.get("GPU", 0.0)) for n in nodes)
    parts = [f"{count} x {cpu:g} CPU" + (f" + {gpu:g} GPU" if gpu else "")
             for (cpu, gpu), count in sorted(shapes.items())]
    return f"{len(nodes)} node(s): {', '.join(parts) or 'none'}"


def _ask(plan: WorkerPlan) -> str:
    gpu = f" and {plan.gpus:g} GPU" if plan.gpus else ""
    return f"{plan.num} worker(s) of {plan.cpus:g} CPU{gpu} each"


def check_placeable(plan: WorkerPlan, nodes: list[dict] | None = None, *,
                    autoscale: bool = False, what: str = "Ray Train",
                    keys: str = "ray.num_workers, ray.cpus_per_worker, ray.use_gpu") -> None:
    """Raise ResourceError at once when the workers can never run on the current nodes.

    Each worker needs its CPUs and GPUs on one node, and all of them together (Ray would
    otherwise wait forever for a node that never comes). Checked against the nodes' totals:
    resources merely busy now (another trial, the teacher service) are waited for, with a
    log line. With `autoscale`, nothing is refused: the request waits for new nodes.
    """
    fresh = nodes is None
    if nodes is None:
        nodes = alive_nodes()
    fits = _fit(nodes, plan.cpus, plan.gpus)
    if fits < plan.num:
        if autoscale:
            log.info("%s asks for %s; the nodes now (%s) hold %d: waiting for the autoscaler "
                     "to add nodes (ray.autoscale=true)", what, _ask(plan), _describe(nodes),
                     fits)
            return
        hint = ""
        most = autoscaler_max_resources() if fresh else None
        if most:
            hint = (f" The cluster's autoscaler may add nodes (up to {most.get('CPU', 0):g} "
                    f"CPU, {most.get('GPU', 0):g} GPU): set ray.autoscale=true to wait for "
                    f"them.")
        raise ResourceError(
            f"{what} asks for {_ask(plan)}, but the Ray cluster ({_describe(nodes)}) holds "
            f"{'none' if fits == 0 else f'only {fits}'} (a worker runs on one node). Change "
            f"{keys} (left unset, they are sized from the nodes), add nodes, or set "
            f"ray.autoscale=true on a cluster that adds nodes on demand.{hint}")
    if fresh:
        _log_if_busy(plan, what)


def _log_if_busy(plan: WorkerPlan, what: str) -> None:
    """One log line when the workers fit the cluster but not what is free now."""
    try:
        from ray._private import state

        free = list(state.available_resources_per_node().values())
    except Exception:  # noqa: BLE001 - private API gone or GCS busy: only a log line lost
        return
    fits = _fit(free, plan.cpus, plan.gpus)
    if fits < plan.num:
        log.info("%s asks for %s; what is free now holds %d: waiting for other work to "
                 "finish", what, _ask(plan), fits)


def match_torch_threads() -> float:
    """In a Ray task or actor: as many torch threads as CPUs Ray gave it (rounded, at least
    one), since more only contend with the other workers on the node. Returns those CPUs
    (0 when Ray assigned none, and the thread count is left alone)."""
    import ray
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0)
    if cpus:
        torch.set_num_threads(max(1, int(cpus + 0.5)))
    return cpus
