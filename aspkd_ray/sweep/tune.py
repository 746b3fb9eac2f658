"""Ray Tune sweeps over ASPKD settings (σ, k, rounds, learning rates, ...).

A sweep file names a base config, fixed overrides and a search space of dotted keys:

    base: digits.yaml                  # relative to the sweep file
    overrides: ["training.max_epochs=20"]
    sweep:
      metric: agreement
      mode: max
      num_samples: 1                   # repeats of the grid / random draws
      max_concurrent_trials: null      # null = from the cluster's resources
      global_budget: null              # the shared teacher service's cap; null = n x trials
      space:
        aspkd.sigma: {grid: [0.5, 1.0, 2.0]}
        aspkd.k: {choice: [3, 5, 10]}
        training.lr: {loguniform: [1.0e-4, 1.0e-2]}

Each trial is one ASPKD attack (`run_steal`), its own Ray Train run and MLflow run. All
trials share one proxy set and one teacher service: a label bought by one trial is free for
the others, each trial is capped at its own budget n, and the service caps the sweep.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any

import yaml

from aspkd_ray import console, storage
from aspkd_ray.config import Config, ConfigError, from_dict, total_budget
from aspkd_ray.layout import join, run_layout
from aspkd_ray.runtime.resources import alive_nodes, largest_fitting_cpus

log = logging.getLogger(__name__)

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
SWEEP_KEYS = {"metric", "mode", "num_samples", "max_concurrent_trials", "global_budget",
              "space"}


@dataclasses.dataclass
class SweepSpec:
    base: dict[str, Any]
    overrides: list[str]
    space: dict[str, dict[str, list]]
    metric: str = "agreement"
    mode: str = "max"
    num_samples: int = 1
    max_concurrent_trials: int | None = None
    global_budget: int | None = None

    def num_trials(self) -> int:
        grid = math.prod(len(v["grid"]) for v in self.space.values() if "grid" in v)
        return grid * self.num_samples


def load_sweep(path: str | Path, extra_overrides: list[str] = ()) -> SweepSpec:
    """Read and validate a sweep file; the base config is validated with every grid value."""
    from aspkd_ray.config.packaged import resolve_config_path

    path = resolve_config_path(path, "--sweep")  # a file, or a packaged name
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = set(raw) - {"base", "overrides", "sweep"}
    if unknown:
        raise ConfigError(f"unknown key {sorted(unknown)[0]} in {path}; accepted: base, "
                          f"overrides, sweep.")
    base_path = path.parent / raw.get("base", "")
    if "base" not in raw or not base_path.is_file():
        raise ConfigError(f"base: {raw.get('base')!r} in {path} is not a config file next to "
                          f"it; expected e.g. 'base: digits.yaml'.")
    sweep = raw.get("sweep") or {}
    unknown = set(sweep) - SWEEP_KEYS
    if unknown:
        raise ConfigError(f"unknown key sweep.{sorted(unknown)[0]}; accepted: "
                          f"{', '.join(sorted(SWEEP_KEYS))}.")
    space = sweep.get("space") or {}
    if not space:
        raise ConfigError("sweep.space: empty; give at least one key, e.g. "
                          "aspkd.sigma: {grid: [0.5, 1, 2]}.")
    for key, dist in space.items():
        if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
            raise ConfigError(f"sweep.space.{key}: got {dist!r}; expected one of "
                              f"{{{' | '.join(DISTRIBUTIONS)}: [values or bounds]}}.")
    spec = SweepSpec(base=yaml.safe_load(base_path.read_text()) or {},
                     overrides=list(raw.get("overrides") or []) + list(extra_overrides),
                     space=space, metric=sweep.get("metric", "agreement"),
                     mode=sweep.get("mode", "max"), num_samples=int(sweep.get("num_samples", 1)),
                     max_concurrent_trials=sweep.get("max_concurrent_trials"),
                     global_budget=sweep.get("global_budget"))
    if spec.mode not in ("max", "min"):
        raise ConfigError(f"sweep.mode: got {spec.mode!r}; expected max or min.")
    # Every key of the space must be a valid config key with valid values.
    for key, dist in space.items():
        kind, values = next(iter(dist.items()))
        probe = values if kind in ("grid", "choice") else values[:1]
        for v in probe:
            from_dict(spec.base, spec.overrides + [f"{key}={json.dumps(v)}"])
    return spec


def _search_space(space: dict[str, dict[str, list]]) -> dict[str, Any]:
    from ray import tune

    out = {}
    for key, dist in space.items():
        kind, values = next(iter(dist.items()))
        if kind == "grid":
            out[key] = tune.grid_search(values)
        elif kind == "choice":
            out[key] = tune.choice(values)
        else:  # uniform / loguniform / randint take bounds
            out[key] = getattr(tune, kind)(*values)
    return out


def trial_config(spec: SweepSpec, params: dict[str, Any], shared: dict[str, str],
                 trial: str) -> Config:
    """The trial's Config: base + overrides + its parameters, its own storage root under the
    sweep's (trials/<trial>), and the sweep's shared proxy set and ledger."""
    sets = [f"{k}={json.dumps(v)}" for k, v in sorted(params.items())]
    own = join(shared["root"], "trials", trial)
    pins = [f"storage.root={json.dumps(own)}",
            f"proxy.dir={json.dumps(shared['proxy_parent'])}",
            f"budget.ledger={json.dumps(shared['ledger'])}"]
    if not storage.is_uri(own):
        pins.append(f"output_dir={json.dumps(own)}")
    return from_dict(spec.base, spec.overrides + sets + pins)


def _trial(config: dict) -> None:
    """One Tune trial: one ASPKD attack, reported to Tune."""
    import ray.tune

    from aspkd_ray.jobs.steal import run_steal

    spec: SweepSpec = config.pop("__spec__")
    shared = config.pop("__shared__")
    budget_cap = config.pop("__service_budget__")
    ctx = ray.tune.get_context()
    trial = ctx.get_trial_name() or ctx.get_trial_id()
    cfg = trial_config(spec, config, shared, trial)
    summary = run_steal(cfg, trial=trial, service_budget=budget_cap)
    ray.tune.report({"agreement": summary["agreement"], "calls_used": summary["calls_used"],
                     "pseudo_label_agreement": summary["pseudo_label_agreement"] or 0.0,
                     "mlflow_run_id": summary["mlflow_run_id"]})


def run_sweep(spec: SweepSpec, output_dir: str | Path) -> list[dict]:
    """Run the sweep; returns one row per trial (params and results), best first."""
    import ray
    from ray import tune

    from aspkd_ray.jobs.steal import ensure_proxy, ensure_victim
    from aspkd_ray.runtime import connect

    base_cfg = from_dict(spec.base, spec.overrides + [f"output_dir={json.dumps(str(output_dir))}"])
    lay = run_layout(base_cfg)
    if not storage.is_uri(lay.root):
        Path(lay.root).mkdir(parents=True, exist_ok=True)
    connect(base_cfg.ray.address, base_cfg.ray.namespace)
    # Shared inputs are made once, before trials start.
    ensure_victim(base_cfg)
    proxy = ensure_proxy(base_cfg)
    from aspkd_ray.generation import read_manifest

    num_classes = len(read_manifest(proxy).get("class_names") or ())
    n = total_budget(base_cfg, num_classes)
    service_budget = spec.global_budget or n * max(spec.num_trials(), 1)
    # Trials run in other working directories: pin every path to what the driver resolved.
    pinned = [f"cache_dir={json.dumps(base_cfg.cache_dir)}"]
    for key, value in (("dataset.root", base_cfg.dataset.root),
                       ("victim.checkpoint", base_cfg.victim.checkpoint),
                       ("student.init_checkpoint", base_cfg.student.init_checkpoint),
                       ("generator.model", base_cfg.generator.model)):
        if value is not None:
            pinned.append(f"{key}={json.dumps(value)}")
    spec.overrides = spec.overrides + pinned + [f"budget.per_trial={n}",
                                       "ray.teacher_service="
                                       f"{base_cfg.ray.teacher_service}-sweep"]
    shared = {"root": lay.root, "proxy_parent": proxy.rsplit("/", 1)[0], "ledger": lay.ledger}
    # The shared teacher service is started here, by the driver, so it outlives every trial.
    from aspkd_ray.teacher import connect_teacher_service

    service_cfg = from_dict(spec.base, spec.overrides + [
        f"output_dir={json.dumps(str(output_dir))}", f"budget.ledger={json.dumps(lay.ledger)}"])
    connect_teacher_service(service_cfg, num_classes, budget=service_budget)
    resources = ray.cluster_resources()
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 1.0)
    concurrent = spec.max_concurrent_trials or max(
        1, int(gpus // (base_cfg.ray.num_workers or 1)) if gpus >= 1 else int(cpus // 2))
    if not gpus and base_cfg.ray.cpus_per_worker is None:
        # Trials' Train workers share the CPUs; the teacher service and drivers keep 0.5.
        per = max(round((cpus - 0.5 - 0.1 * concurrent) / concurrent, 2), 0.1)
        # A worker lives on one node: never more than the nodes can hold side by side.
        per = largest_fitting_cpus(per, alive_nodes(),
                                   concurrent * (base_cfg.ray.num_workers or 1))
        spec.overrides.append(f"ray.cpus_per_worker={per}")
    _write(join(lay.root, "sweep.json"), dataclasses.asdict(spec))
    log.info("sweep: %d trial(s), %d at a time, service budget %d (n = %d per trial)",
             spec.num_trials(), concurrent, service_budget, n)
    param_space = {**_search_space(spec.space), "__spec__": spec, "__shared__": shared,
                   "__service_budget__": service_budget}
    tune_fs, tune_path = storage.resolve(lay.tune)
    tuner = tune.Tuner(
        tune.with_resources(_trial, {"CPU": 0.1}),
        param_space=param_space,
        tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode,
                                    num_samples=spec.num_samples,
                                    max_concurrent_trials=concurrent),
        run_config=tune.RunConfig(name="sweep", storage_path=tune_path,
                                  storage_filesystem=None if storage.is_local(tune_fs)
                                  else tune_fs,
                                  # Tune's trial tables print from the driver: -v only
                                  verbose=None if console.verbose() else 0),
    )
    results = tuner.fit()
    rows = []
    for r in results:
        params = {k: v for k, v in (r.config or {}).items() if not k.startswith("__")}
        rows.append({**params, **{k: r.metrics.get(k) for k in
                                  ("agreement", "calls_used", "pseudo_label_agreement",
                                   "mlflow_run_id")},
                     "error": str(r.error) if r.error else None})
    def rank(row: dict) -> float:
        value = row.get(spec.metric)
        if value is None:
            return math.inf  # failed trials last
        return -value if spec.mode == "max" else value

    rows.sort(key=rank)
    _write(join(lay.root, "sweep_results.json"), rows)
    return rows


def _write(location: str, data: object) -> None:
    storage.write_bytes(*storage.resolve(location),
                        json.dumps(data, indent=2, default=str).encode())
