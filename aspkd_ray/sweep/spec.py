"""A sweep file, read and checked before Ray starts.

    base: digits.yaml                  # relative to the sweep file
    overrides: ["training.max_epochs=20"]
    sweep:
      objective: attacker              # attacker (default) | research
      search: basic                    # basic (grid and random draws) | optuna
      scheduler: fifo                  # fifo | asha (stops weak trials after a round)
      num_samples: 1                   # basic: repeats of the grid; optuna: trials
      seed: null                       # the search's draws; null = the base config's seed
      val_per_class: 5                 # attacker objective: shared bought validation labels
      max_concurrent_trials: null      # null = from the cluster's resources
      global_budget: null              # the shared teacher service's cap; null = what the
                                       # trials and the validation labels need
      asha: {grace_rounds: 1, reduction_factor: 2}
      space:
        aspkd.sigma: {grid: [0.5, 1.0, 2.0]}
        aspkd.k: {choice: [3, 5, 10]}
        training.lr: {loguniform: [1.0e-4, 1.0e-2]}

Objectives. `attacker`: agreement with a validation subset of the proxy set whose labels the
sweep buys once from the victim (from the global budget) and every trial shares; an attacker
can compute it. `research`: agreement with the victim on its real test set, which only the
experimenter can measure; results and MLflow runs are tagged with it. Test agreement is
measured for every trial in both modes, after the trials, by the sweep's driver.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import yaml

from aspkd_ray.config import ConfigError, from_dict

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
OBJECTIVES = {"attacker": "val_agreement", "research": "agreement"}  # objective -> metric
SWEEP_KEYS = {"objective", "search", "scheduler", "num_samples", "seed", "val_per_class",
              "max_concurrent_trials", "global_budget", "asha", "space"}
ASHA_KEYS = {"grace_rounds", "reduction_factor"}


@dataclasses.dataclass
class SweepSpec:
    base: dict[str, Any]
    overrides: list[str]
    space: dict[str, dict[str, list]]
    objective: str = "attacker"
    search: str = "basic"
    scheduler: str = "fifo"
    num_samples: int = 1
    seed: int | None = None
    val_per_class: int = 5
    max_concurrent_trials: int | None = None
    global_budget: int | None = None
    asha: dict[str, int] = dataclasses.field(default_factory=lambda: {"grace_rounds": 1,
                                                                     "reduction_factor": 2})

    @property
    def metric(self) -> str:
        """What Tune maximises: val_agreement (attacker) or agreement (research)."""
        return OBJECTIVES[self.objective]

    def num_trials(self) -> int:
        if self.search != "basic":
            return self.num_samples
        grid = math.prod(len(v["grid"]) for v in self.space.values() if "grid" in v)
        return grid * self.num_samples

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _int(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}: got {value!r}; expected an integer >= {minimum}.")
    return value


def load_sweep(path: str | Path, extra_overrides: list[str] = ()) -> SweepSpec:
    """Read and validate a sweep file; the base config is validated with every grid value."""
    from aspkd_ray.config.packaged import resolve_config_path
    from aspkd_ray.sweep.search import SCHEDULERS, SEARCHES

    path = resolve_config_path(path, "--sweep")  # a file, or a packaged name
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"--sweep {path}: the top level must be a mapping with base, "
                          f"overrides and sweep.")
    unknown = set(raw) - {"base", "overrides", "sweep"}
    if unknown:
        raise ConfigError(f"unknown key {sorted(unknown)[0]} in {path}; accepted: base, "
                          f"overrides, sweep.")
    base_path = path.parent / str(raw.get("base", ""))
    if "base" not in raw or not base_path.is_file():
        raise ConfigError(f"base: {raw.get('base')!r} in {path} is not a config file next to "
                          f"it; expected e.g. 'base: digits.yaml'.")
    sweep = raw.get("sweep") or {}
    if "metric" in sweep or "mode" in sweep:
        raise ConfigError("sweep.metric / sweep.mode: replaced by sweep.objective: attacker "
                          "(agreement with bought validation labels, what an attacker can "
                          "measure; the default) or research (test agreement); both are "
                          "maximised.")
    unknown = set(sweep) - SWEEP_KEYS
    if unknown:
        raise ConfigError(f"unknown key sweep.{sorted(unknown)[0]}; accepted: "
                          f"{', '.join(sorted(SWEEP_KEYS))}.")
    space = sweep.get("space") or {}
    if not isinstance(space, dict) or not space:
        raise ConfigError("sweep.space: empty; give at least one key, e.g. "
                          "aspkd.sigma: {grid: [0.5, 1, 2]}.")
    for key, dist in space.items():
        if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS \
                or not isinstance(next(iter(dist.values())), list):
            raise ConfigError(f"sweep.space.{key}: got {dist!r}; expected one of "
                              f"{{{' | '.join(DISTRIBUTIONS)}: [values or bounds]}}.")
    asha = {"grace_rounds": 1, "reduction_factor": 2, **(sweep.get("asha") or {})}
    if set(asha) - ASHA_KEYS:
        raise ConfigError(f"unknown key sweep.asha.{sorted(set(asha) - ASHA_KEYS)[0]}; "
                          f"accepted: {', '.join(sorted(ASHA_KEYS))}.")
    spec = SweepSpec(
        base=yaml.safe_load(base_path.read_text()) or {},
        overrides=list(raw.get("overrides") or []) + list(extra_overrides), space=space,
        objective=sweep.get("objective", "attacker"), search=sweep.get("search", "basic"),
        scheduler=sweep.get("scheduler", "fifo"),
        num_samples=_int("sweep.num_samples", sweep.get("num_samples", 1), 1),
        seed=None if sweep.get("seed") is None else _int("sweep.seed", sweep["seed"], 0),
        val_per_class=_int("sweep.val_per_class", sweep.get("val_per_class", 5), 1),
        max_concurrent_trials=None if sweep.get("max_concurrent_trials") is None else
        _int("sweep.max_concurrent_trials", sweep["max_concurrent_trials"], 1),
        global_budget=None if sweep.get("global_budget") is None else
        _int("sweep.global_budget", sweep["global_budget"], 1),
        asha={"grace_rounds": _int("sweep.asha.grace_rounds", asha["grace_rounds"], 1),
              "reduction_factor": _int("sweep.asha.reduction_factor",
                                       asha["reduction_factor"], 2)})
    if spec.objective not in OBJECTIVES:
        raise ConfigError(f"sweep.objective: got {spec.objective!r}; expected one of: "
                          f"{', '.join(OBJECTIVES)}.")
    for registry, name in ((SEARCHES, spec.search), (SCHEDULERS, spec.scheduler)):
        try:
            registry.get(name)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    grids = [k for k, v in space.items() if "grid" in v]
    if spec.search != "basic" and grids:
        raise ConfigError(f"sweep.space.{grids[0]}: grid is for sweep.search=basic; with "
                          f"{spec.search} use choice (and sweep.num_samples trials).")
    # Every key of the space must be a valid config key with valid values.
    for key, dist in space.items():
        kind, values = next(iter(dist.items()))
        probe = values if kind in ("grid", "choice") else values[:1]
        for v in probe:
            from_dict(spec.base, spec.overrides + [f"{key}={json.dumps(v)}"])
    return spec
