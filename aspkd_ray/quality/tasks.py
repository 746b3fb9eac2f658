"""The benchmark's Ray tasks: thin wrappers that run a cell or an init step in a worker."""

from __future__ import annotations

import ray

from aspkd_ray.quality.cell import Cell, InitState, init_step, run_cell
from aspkd_ray.quality.scenario import Scenario
from aspkd_ray.runtime.resources import match_torch_threads  # one cell per CPU it asked for


@ray.remote
def init_task(scn: Scenario, seed: int) -> InitState:
    match_torch_threads()
    return init_step(scn, seed)


@ray.remote
def cell_task(scn: Scenario, cell: Cell, init: InitState | None) -> dict:
    match_torch_threads()
    return run_cell(scn, cell, init)
