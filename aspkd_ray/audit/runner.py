"""`aspkd audit`: the owner's view of a theft. Each configured attack runs against the victim
over a ladder of budgets, undefended and behind each configured defence, and PRADA watches
every attack's query stream and a benign stream of the victim's real test images.

The owner may query their own model freely, so the victim answers the whole proxy set once
(through the evaluation oracle) and each trial is the quality benchmark's cell: the product's
round loop in a Ray task, buying through the teacher service's own budget rule, sold the
answers of the teacher service's defence (`teacher.defences`, applied per image exactly as
the service applies it). The undefended answers are kept for measuring; a trial never sees
them behind a defence.
"""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path

import numpy as np

from aspkd_ray.config import Config, ConfigError
from aspkd_ray.quality.cell import Cell
from aspkd_ray.quality.scenario import Scenario

NONE = "none"  # the undefended victim's label
ZERO_CALLS = "prompt_only"  # the no-call reference: prompt labels only


def check_audit(cfg: Config) -> None:
    """The audit section, before any work: each key named in the error."""
    from aspkd_ray.quality.methods import METHODS
    from aspkd_ray.teacher.defences import parse_defence

    a = cfg.audit
    if not a.calls_per_class or min(a.calls_per_class) < 1:
        raise ConfigError(f"audit.calls_per_class: got {a.calls_per_class}; expected a "
                          f"non-empty list of integers >= 1, e.g. [1, 4, 16, 64].")
    if not a.seeds or min(a.seeds) < 0:
        raise ConfigError(f"audit.seeds: got {a.seeds}; expected a non-empty list of "
                          f"integers >= 0.")
    for i, spec in enumerate(a.defences):
        parse_defence(spec, key=f"audit.defences[{i}]")
    budgeted = [m for m in METHODS.names() if METHODS.get(m).budgeted
                and METHODS.get(m).pool == "proxy"]
    for i, name in enumerate(a.attacks):
        if name not in budgeted:
            raise ConfigError(f"audit.attacks[{i}]: got {name!r}; expected one of: "
                              f"{', '.join(budgeted)}.")
    if not a.attacks:
        raise ConfigError("audit.attacks: got an empty list; expected e.g. [default, "
                          "vanilla].")
    if any(not 0 < lv <= 100 for lv in a.levels):
        raise ConfigError(f"audit.levels: got {a.levels}; expected percentages in (0, 100].")


def defence_label(spec: dict | None) -> str:
    """'none', 'top1', 'rounding(decimals=1)': how tables name a defence."""
    if spec is None:
        return NONE
    from aspkd_ray.teacher.defences import parse_defence

    bound = parse_defence(spec)
    args = ", ".join(f"{k}={v}" for k, v in bound.params.items())
    return f"{bound.name}({args})" if args else bound.name


def defended_name(scn: Scenario, spec: dict | None) -> str:
    return f"{scn.name}/{defence_label(spec)}"


def defended_scenario(scn: Scenario, spec: dict | None) -> Scenario:
    """The scenario with the teacher behind a defence: its own name, the base scenario's
    init step, and every trial's query order recorded."""
    from aspkd_ray.teacher.defences import parse_defence, row_keys

    out = dataclasses.replace(scn, name=defended_name(scn, spec), init_as=scn.name,
                              record_queries=True)
    bound = parse_defence(spec)
    if bound is None:
        return out
    x = scn.pools["proxy"].x
    served = bound(scn.answers["proxy", "soft"], row_keys(x))
    if bound.hard:  # class ids only: the attack runs in hard-label mode
        return dataclasses.replace(out, overrides=(*scn.overrides, "victim.output=hard"),
                                   served={("proxy", "hard"): served})
    return dataclasses.replace(out, served={("proxy", "soft"): served.astype(np.float32)})


def trial_overrides(cfg: Config) -> list[str]:
    """The audit's shorter training, as --set overrides of every trial."""
    a, out = cfg.audit, []
    if a.max_epochs is not None:
        out.append(f"training.max_epochs={a.max_epochs}")
    if a.step_size is not None:
        out.append(f"training.step_size={a.step_size}")
    return out


def run_audit(config: str, overrides: list[str], output_dir: str, command: str = "") -> dict:
    """Run every trial (resuming from `output_dir/trials.json`), PRADA and the utility cost;
    write audit.md, audit.json and the plots; log them to MLflow. Returns the summary."""
    import ray

    from aspkd_ray.audit.report import summarise, write_report
    from aspkd_ray.config import load
    from aspkd_ray.quality.runner import Results, check_budgets, run_cells
    from aspkd_ray.quality.scenario import prepare_scenario
    from aspkd_ray.runtime.ray_connect import connect

    cfg = load(config, overrides, output_dir)
    check_audit(cfg)
    out = Path(output_dir)
    t0 = time.time()
    connect()
    extra = trial_overrides(cfg)
    scn = prepare_scenario(config, [*overrides, *extra])
    settings = {"overrides": [*overrides, *extra], "config": config,
                "audit": dataclasses.asdict(cfg.audit)}
    results = Results.open(out / "trials.json", settings)
    results.check_scenario(scn.name, scn.config_hash)
    results.scenarios[scn.name] = scn.describe()
    specs = [None, *cfg.audit.defences]
    scenarios = {}
    for spec in specs:
        d = defended_scenario(scn, spec)
        scenarios[d.name] = {"scenario": d, "ref": ray.put(d), "spec": spec}
    cells = [Cell(name, attack, b, seed) for seed in cfg.audit.seeds for name in scenarios
             for attack in cfg.audit.attacks for b in cfg.audit.calls_per_class]
    # What a thief gets with no call at all: the generator's prompts as labels.
    cells += [Cell(defended_name(scn, None), ZERO_CALLS, None, seed) for seed in cfg.audit.seeds]
    failed = run_cells(scenarios, cells, results, cfg.audit.cpus_per_trial)
    over = check_budgets(results.rows)
    if over:
        raise RuntimeError(f"{len(over)} trials used more calls than their budget: {over[:3]}")
    summary = summarise(cfg, scn, scenarios, results.rows, failed,
                        wall_s=round(time.time() - t0, 1))
    summary["command"] = command or (f"aspkd audit --config {config} --output-dir "
                                     f"{output_dir}" + "".join(f" --set {o}" for o in overrides))
    summary["paths"] = [str(p) for p in write_report(summary, out)]
    _log_mlflow(cfg, summary, out)
    return summary


def _log_mlflow(cfg: Config, summary: dict, out: Path) -> None:
    import mlflow

    from aspkd_ray.tracking import mlflow_run

    with mlflow_run(cfg, f"audit-{cfg.dataset.name}", tags={"stage": "audit"}) as run:
        for row in summary["curves"]:
            for point in row["points"]:
                mlflow.log_metric(_metric(f"agreement.{row['defence']}.{row['attack']}"),
                                  point["agreement"], step=point["calls"])
        for name in ("audit.md", "audit.json", "audit.png"):
            if (out / name).exists():
                mlflow.log_artifact(str(out / name))
        summary["mlflow_run_id"] = run.info.run_id


def _metric(name: str) -> str:
    """An MLflow metric name: `top1`, `rounding_decimals-1` (MLflow refuses '(', '=', ',')."""
    name = name.replace("(", "_").replace(")", "").replace(", ", "_").replace("=", "-")
    return re.sub(r"[^\w\-. /:]", "", name)
