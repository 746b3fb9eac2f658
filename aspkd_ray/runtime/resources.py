"""Size actor pools and worker groups from what Ray reports, never from constants.

On a 2-CPU machine two 1-CPU actors plus a Ray Data read task deadlock (DESIGN.md), so CPU
work is given fractional requests that leave room for the rest of the pipeline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerPlan:
    num: int
    cpus: float
    gpus: float

    @property
    def use_gpu(self) -> bool:
        return self.gpus > 0


def plan_workers(*, requested: int | None = None, use_gpu: bool | None = None,
                 cpus_per_worker: float | None = None, reserve_cpus: float = 0.5,
                 resources: dict | None = None) -> WorkerPlan:
    """How many workers, and what each asks for.

    GPUs present (and not refused): one worker per GPU. Otherwise CPU workers share what is
    left after `reserve_cpus` (for drivers, Ray Data reads, the teacher service).
    """
    if resources is None:
        import ray

        resources = ray.cluster_resources()
    total_cpu = float(resources.get("CPU", 1.0))
    total_gpu = float(resources.get("GPU", 0.0))
    gpu = (total_gpu >= 1) if use_gpu is None else use_gpu
    if gpu and total_gpu < 1:
        raise ValueError("ray.use_gpu=true but the Ray cluster reports no GPU; set "
                         "ray.use_gpu=null to use CPUs, or connect to a GPU cluster.")
    free_cpu = max(total_cpu - reserve_cpus, 0.25)
    if gpu:
        num = requested or int(total_gpu)
        cpus = cpus_per_worker or max(min(free_cpu / num, 4.0), 0.25)
        return WorkerPlan(num, round(cpus, 3), 1.0)
    num = requested or 1
    cpus = cpus_per_worker or max(math.floor(free_cpu / num * 100) / 100, 0.1)
    return WorkerPlan(num, cpus, 0.0)
