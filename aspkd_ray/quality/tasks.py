"""The benchmark's Ray tasks: thin wrappers that run a cell or an init step in a worker."""

from __future__ import annotations

import ray
import torch

from aspkd_ray.quality.cell import Cell, InitState, init_step, run_cell
from aspkd_ray.quality.scenario import Scenario


def _threads() -> None:
    # One cell per CPU it asked for: more torch threads than that only contend.
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    torch.set_num_threads(max(1, int(cpus)))


@ray.remote
def init_task(scn: Scenario, seed: int) -> InitState:
    _threads()
    return init_step(scn, seed)


@ray.remote
def cell_task(scn: Scenario, cell: Cell, init: InitState | None) -> dict:
    _threads()
    return run_cell(scn, cell, init)
