"""The quality benchmark's driver: cells as Ray tasks, rows saved as each finishes, a rerun
continues where the last one stopped.

    python scripts/bench_quality.py            # the full grid → benchmarks/quality.*
    python scripts/bench_quality.py --quick    # a small grid, a few minutes

Stages: prepare each scenario (victim, proxy set, answers) → run the base seeds → add seeds
where the spread is large → check every cell's calls against its budget → write the report.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from aspkd_ray.errors import UserError
from aspkd_ray.quality.cell import Cell, cell_config, needs_init
from aspkd_ray.quality.methods import get_method, method_names

SPREAD = 2.0  # points of std over the base seeds above which a budget gets the extra seeds


@dataclass(frozen=True)
class Grid:
    budgets: tuple[int, ...]
    seeds: tuple[int, ...]
    extra_seeds: tuple[int, ...]
    overrides: tuple[str, ...]   # what the benchmark changes in the scenarios' configs


FULL = Grid(budgets=(1, 2, 4, 8, 16, 32, 64), seeds=(0, 1, 2), extra_seeds=(3, 4),
            # half the configs' epochs, the same decay (5 halvings): the grid fits in 2 hours
            overrides=("training.max_epochs=10", "training.step_size=2"))
QUICK = Grid(budgets=(2, 8), seeds=(0, 1), extra_seeds=(),
             overrides=("training.max_epochs=3", "training.step_size=1"))


@dataclass
class Results:
    """quality.json: the settings, what each scenario's victim is, and one row per cell."""

    path: Path
    settings: dict
    scenarios: dict = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)

    @classmethod
    def open(cls, path: Path, settings: dict | None, fresh: bool = False) -> Results:
        """The results at `path` (settings None: as saved, for a report)."""
        if settings is not None and (fresh or not path.exists()):
            return cls(path, settings)
        if not path.exists():
            raise UserError(f"{path} does not exist: run the benchmark first.")
        old = json.loads(path.read_text())
        if settings is None:
            return cls(path, old["settings"], old.get("scenarios", {}), old.get("rows", []))
        if old.get("settings", {}).get("overrides") != settings["overrides"]:
            raise UserError(f"{path} holds rows made with --set {old['settings']['overrides']}"
                            f", not {settings['overrides']}; rerun with the same settings to "
                            f"continue it, or pass --fresh to start over.")
        return cls(path, settings, old.get("scenarios", {}), old.get("rows", []))

    def check_scenario(self, name: str, settings_hash: str) -> None:
        """Rows of `name` must come from the same scenario config (its YAML may change)."""
        old = self.scenarios.get(name, {}).get("config_hash")
        if old and old != settings_hash and any(r["scenario"] == name for r in self.rows):
            raise UserError(f"{self.path} holds {name} rows made with another config of that "
                            f"scenario (hash {old}, now {settings_hash}); rerun with --fresh "
                            f"or another --output-dir.")

    def done(self) -> set[tuple]:
        return {(r["scenario"], r["method"], r["calls_per_class"], r["seed"])
                for r in self.rows}

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.save()

    def save(self) -> None:
        """Atomically: a crash leaves the last complete file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"settings": self.settings, "scenarios": self.scenarios,
                                   "rows": self.rows}, indent=1))
        os.replace(tmp, self.path)


def cells_for(scenario: str, methods: list[str], budgets: tuple[int, ...],
              seeds: tuple[int, ...]) -> list[Cell]:
    out = []
    for seed in seeds:
        for m in methods:
            if get_method(m).budgeted:
                out += [Cell(scenario, m, b, seed) for b in budgets]
            else:
                out.append(Cell(scenario, m, None, seed))
    return out


def spread_blocks(rows: list[dict], scenario: str, seeds: tuple[int, ...]) -> set:
    """The budgets (None for the budget-free methods) where some method's std over `seeds`
    is above SPREAD."""
    values: dict = {}
    for r in rows:
        if r["scenario"] == scenario and r["seed"] in seeds:
            values.setdefault((r["calls_per_class"], r["method"]), []).append(r["agreement"])
    return {b for (b, _), v in values.items() if len(v) > 1 and statistics.stdev(v) > SPREAD}


def extra_cells(rows: list[dict], scenarios: list[str], methods: list[str],
                budgets: tuple[int, ...], seeds: tuple[int, ...],
                extra: tuple[int, ...]) -> list[Cell]:
    """The extra seeds' cells: every method at each budget where the base seeds disagree by
    more than SPREAD, and the budget-free methods (which pair with every budget) once."""
    out: list[Cell] = []
    budgeted = [m for m in methods if get_method(m).budgeted]
    free = [m for m in methods if not get_method(m).budgeted]
    for s in scenarios:
        wide = spread_blocks(rows, s, seeds) if extra else set()
        out += cells_for(s, budgeted, tuple(b for b in budgets if b in wide), extra)
        if wide:
            out += cells_for(s, free, (), extra)
    return out


def run_cells(scenarios: dict, cells: list[Cell], results: Results, cpus: float) -> list:
    """Every cell as a Ray task (cells sharing a scenario's init step wait for it); rows are
    saved as they come. Returns the cells that failed."""
    import ray

    from aspkd_ray.quality import tasks

    done = results.done()
    todo = list({c.key: c for c in cells if c.key not in done}.values())  # each cell once
    if not todo:
        return []
    inits: dict = {}
    pending = {}
    for c in todo:
        scn_ref = scenarios[c.scenario]["ref"]
        init = None
        scn = scenarios[c.scenario]["scenario"]
        if needs_init(cell_config(scn, c)):
            group = (scn.init_as or c.scenario, c.seed)
            if group not in inits:
                inits[group] = tasks.init_task.options(num_cpus=cpus).remote(scn_ref, c.seed)
            init = inits[group]
        pending[tasks.cell_task.options(num_cpus=cpus).remote(scn_ref, c, init)] = c
    failed, n, t0 = [], len(pending), time.time()
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        c = pending.pop(ready[0])
        k = n - len(pending)
        try:
            row = ray.get(ready[0])
        except Exception as exc:  # noqa: BLE001 — one failed cell must not lose the others
            failed.append(c)
            print(f"[{k}/{n}] {_name(c)}: FAILED ({type(exc).__name__}: "
                  f"{str(exc).splitlines()[0][:200]})", flush=True)
            continue
        results.add(row)
        eta = (time.time() - t0) / k * (n - k)
        print(f"[{k}/{n}] {_name(c)}: {row['agreement']:.1f}% agreement, "
              f"{row['calls_used']}/{row['budget']} calls, {row['wall_s']:.0f} s "
              f"(about {eta / 60:.0f} min left)", flush=True)
    return failed


def _name(c: Cell) -> str:
    budget = "" if c.calls_per_class is None else f" {c.calls_per_class}/class"
    return f"{c.scenario} {c.method}{budget} seed {c.seed}"


def check_budgets(rows: list[dict]) -> list[dict]:
    """Rows whose attack used more calls than its budget (the benchmark's own check)."""
    return [r for r in rows if r["calls_used"] > r["budget"]]


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="bench_quality", description="The paper's Table 3 and budget curve on the "
        "embedded scenarios, paired seeds, bootstrap CIs; resumable.")
    ap.add_argument("--quick", action="store_true",
                    help="a small grid (2 and 8 calls per class, 2 seeds, 3 epochs)")
    ap.add_argument("--scenarios", nargs="+", default=["digits", "digits-xdomain"],
                    help="packaged config names or YAML files")
    ap.add_argument("--methods", nargs="+", default=None, help="default: the grid's (every registered method but the variants beyond the paper)")
    ap.add_argument("--budgets", nargs="+", type=int, default=None,
                    help="calls per class (default: the grid's)")
    ap.add_argument("--seeds", nargs="+", type=int, default=None)
    ap.add_argument("--extra-seeds", nargs="*", type=int, default=None,
                    help=f"seeds added where a method's std is above {SPREAD} points")
    ap.add_argument("--set", action="append", default=[], dest="overrides",
                    help="dotted.key=value for every scenario (after the grid's own)")
    ap.add_argument("--output-dir", default=None,
                    help="default: benchmarks/ (full grid) or runs/bench-quality-quick")
    ap.add_argument("--fresh", action="store_true", help="discard earlier rows")
    ap.add_argument("--cpus-per-cell", type=float, default=1.0)
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite quality.md and the plots from quality.json")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from aspkd_ray.quality.report import write_report

    args = parse(argv)
    grid = QUICK if args.quick else FULL
    budgets = tuple(args.budgets or grid.budgets)
    seeds = tuple(args.seeds if args.seeds is not None else grid.seeds)
    extra = tuple(args.extra_seeds if args.extra_seeds is not None else grid.extra_seeds)
    methods = args.methods or method_names(grid_only=True)
    for m in methods:
        get_method(m)  # an unknown name fails here, naming the accepted ones
    overrides = [*grid.overrides, *args.overrides]
    root = Path(__file__).resolve().parents[2]
    out = Path(args.output_dir or (root / "runs" / "bench-quality-quick" if args.quick
                                   else root / "benchmarks"))
    settings = {"overrides": overrides, "quick": args.quick, "date": time.strftime("%Y-%m-%d"),
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                "command": "python scripts/bench_quality.py " + " ".join(
                    sys.argv[1:] if argv is None else argv)}
    try:
        results = Results.open(out / "quality.json", None if args.report_only else settings,
                               args.fresh)
    except UserError as exc:
        print(f"bench_quality: error: {exc}", file=sys.stderr)
        return 2
    if not args.report_only:
        try:
            failed = _run(args, results, methods, budgets, seeds, extra, overrides)
        except UserError as exc:
            print(f"bench_quality: error: {exc}", file=sys.stderr)
            return 2
        over = check_budgets(results.rows)
        if over:
            raise RuntimeError(f"{len(over)} cells used more calls than their budget: "
                               f"{over[:3]}")
    paths = write_report(results, out)
    print("wrote " + ", ".join(str(p) for p in paths), flush=True)
    return 1 if not args.report_only and failed else 0


def _run(args, results, methods, budgets, seeds, extra, overrides) -> list:
    import ray

    from aspkd_ray.quality.scenario import prepare_scenario, scenario_name
    from aspkd_ray.runtime.ray_connect import connect

    connect()
    scenarios = {}
    for config in args.scenarios:
        t = time.time()
        scn = prepare_scenario(config, overrides)
        results.check_scenario(scn.name, scn.config_hash)
        results.scenarios[scn.name] = scn.describe()
        scenarios[scn.name] = {"scenario": scn, "ref": ray.put(scn)}
        print(f"{scn.name}: victim and pools ready ({time.time() - t:.0f} s); victim test "
              f"accuracy {scn.victim_accuracy:.1f}%", flush=True)
    results.save()
    names = [scenario_name(c) for c in args.scenarios]
    cells = [c for s in names for c in cells_for(s, methods, budgets, seeds)]
    failed = run_cells(scenarios, cells, results, args.cpus_per_cell)
    more = extra_cells(results.rows, names, methods, budgets, seeds, extra)
    if more:
        print(f"{len(more)} more cells: seeds {list(extra)} where a method's std is above "
              f"{SPREAD} points", flush=True)
        failed += run_cells(scenarios, more, results, args.cpus_per_cell)
    return failed
