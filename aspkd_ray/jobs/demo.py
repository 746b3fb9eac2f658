"""`aspkd demo`: the embedded scenario end to end, reusing cached victim, generator and proxy.

The demo tells its stages on the console (aspkd_ray.console): it runs the ones that can take
minutes (victim, proxy set) itself, each with its line, then the attack through run_steal,
whose rounds it follows from their Ray Train checkpoints (`steal_with_progress`, which
`aspkd steal` uses too). Beside what `aspkd steal` writes, the demo's run gets the reference
baselines of its scenario from the committed benchmark (scripts/results/aspkd.json, never
run by the demo) and a grid of proxy samples (proxy_grid.png), in its report and its MLflow
run.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

from aspkd_ray import console, storage
from aspkd_ray.config import Config, config_hash, num_rounds, total_budget
from aspkd_ray.datasets.sources import generator_data_name
from aspkd_ray.layout import join, run_layout

# The committed benchmark (scripts/bench_aspkd.py); absent where only the package is installed.
BENCHMARK = Path(__file__).resolve().parents[2] / "scripts" / "results" / "aspkd.json"
REFERENCE_METHODS = ("prompt_only", "vanilla")  # the baselines the demo's report names
GRID = "proxy_grid.png"


def proxy_cache_dir(cfg: Config) -> Path:
    """A proxy set keyed by everything that shapes it, so demos and sweeps share one."""
    gen = dataclasses.asdict(cfg.generator)
    gen.pop("batch_size")
    proxy = dataclasses.asdict(cfg.proxy)
    proxy.pop("dir")
    if proxy["frame"] is None:  # only when set: caches made before the option stay valid
        proxy.pop("frame")
    # Scenarios whose generator learns the same data share its proxy sets.
    name = generator_data_name(cfg.dataset.name)
    key = config_hash({"generator": gen, "proxy": proxy, "dataset": name,
                       "size": cfg.dataset.image_size, "seed": cfg.seed})
    return Path(cfg.cache_dir) / name / f"proxyset-{key[:10]}"


def demo_config(cfg: Config, output_dir_given: bool) -> Config:
    """Fresh run folder per demo (a finished attack and its spent ledger are not reused),
    proxy set from the cache."""
    out = cfg.output_dir
    if not output_dir_given:
        out = str(Path(cfg.output_dir) / time.strftime("demo-%Y%m%d-%H%M%S"))
    proxy = cfg.proxy
    if proxy.dir is None:
        proxy = dataclasses.replace(proxy, dir=str(proxy_cache_dir(cfg)))
    return dataclasses.replace(cfg, output_dir=out, proxy=proxy)


def run_demo(cfg: Config) -> dict:
    """The demo's stages, each with its console line; returns the summary (written to
    summary.json and MLflow with the demo's own stage times and extras)."""
    from aspkd_ray.generation.store import has_manifest, read_manifest
    from aspkd_ray.jobs.steal import check_victim, ensure_proxy, ensure_victim, preflight
    from aspkd_ray.runtime import connect

    t0 = time.monotonic()
    lay = run_layout(cfg)
    preflight(cfg)  # every input check before anything runs (run_steal repeats them: cheap)
    with console.stage("ray") as st:
        info = connect(cfg.ray.address, cfg.ray.namespace)
        res = info["resources"]
        st.detail = (f"{info['mode']}, {info['nodes']} node(s), {res.get('CPU', 0):g} CPUs, "
                     f"{res.get('GPU', 0):g} GPUs")
    with console.stage("victim") as victim:
        if cfg.victim.endpoint:
            victim.detail = "an HTTP endpoint (nothing to train)"
        elif check_victim(cfg):
            victim.start(f"training the {cfg.dataset.name} victim")
            ensure_victim(cfg)
            victim.detail = "trained"
        else:
            victim.detail = "cached"
    with console.stage("proxy set") as proxy:
        proxy.note = "cached"
        if not has_manifest(lay.proxy):
            proxy.start(f"generating with the {cfg.generator.kind} generator on Ray Data "
                        f"(a generator that needs training is trained first if not cached)")
            with console.watch("proxy set", _shards_written(lay.proxy), "shards",
                               every_s=_poll_every(lay.proxy)):
                ensure_proxy(cfg)
            proxy.note = "generated"
        manifest = read_manifest(lay.proxy)
        proxy.detail = f"{manifest['num_samples']:,} images"
    summary = steal_with_progress(cfg, num_classes=len(manifest["class_names"]))
    # run_steal found the victim and the proxy set ready: its times for them are its checks
    # and loading the pool, added to the demo's.
    times = summary["wall_time_s"]
    mine = {"victim": victim.seconds(), "proxy": proxy.seconds(), "attack": 0.0,
            "evaluation": 0.0}
    summary["wall_time_s"] = {k: round(v + times.get(k, 0.0), 1) for k, v in mine.items()}
    summary["wall_time_s"]["total"] = round(time.monotonic() - t0, 1)
    return publish_extras(cfg, summary)


def steal_with_progress(cfg: Config, *, train_victim: bool = False,
                        num_classes: int | None = None) -> dict:
    """run_steal with its attack told on the console: a bar of the rounds done (polled from
    the Ray Train checkpoints), then the attack's and the evaluation's lines."""
    from aspkd_ray.jobs.steal import run_steal

    with console.stage("attack") as attack:
        if num_classes is not None:
            attack.start(_attack_plan(cfg, num_classes))
        with console.watch("attack", _rounds_done(cfg), "rounds",
                           every_s=_poll_every(run_layout(cfg).train)):
            summary = run_steal(cfg, train_victim=train_victim)
        times = summary["wall_time_s"]
        attack.elapsed = times["attack"]
        attack.detail = (f"{len(summary['agreement_by_round'])} round(s), "
                         f"{summary['calls_used']} of {summary['budget']} teacher calls")
    console.say(f"evaluation: {summary['agreement']:.1f}% agreement with the victim on its "
                f"test set ({console.seconds(times['evaluation'])})")
    return summary


def _attack_plan(cfg: Config, num_classes: int) -> str:
    if cfg.aspkd.baseline == "prompt_only":
        return "the prompt-only baseline on Ray Train (no teacher calls)"
    return (f"{num_rounds(cfg, num_classes)} round(s) of selection, buying and distillation "
            f"on Ray Train, {total_budget(cfg, num_classes)} teacher calls")


def _poll_every(location: str) -> float:
    """Seconds between two looks at a folder: object storage bills every listing."""
    return 10.0 if storage.is_uri(location) else 1.0


def _shards_written(proxy: str) -> console.Poll:
    """(shard files written, shards planned) of a proxy set being generated."""
    from aspkd_ray.generation import store

    folder = store.open_dir(proxy)

    def poll() -> tuple[int, int | None]:
        total = None
        if store.exists(folder, store.PLAN):  # written by the generation before any shard
            plan = store.read_json_at(folder, store.PLAN, "proxy plan")
            total = -(-int(plan["num_samples"]) // int(plan["shard_size"]))
        return len(store.shard_names(folder)), total

    return poll


def _rounds_done(cfg: Config) -> console.Poll:
    """(rounds done, rounds) of an attack: Ray Train keeps one checkpoint folder per round
    under <ray_train>/attack/ (the run name in train/attack.py); a resumed attack starts
    with the rounds it had. The rounds are known once the classes are (the proxy set's)."""
    import pyarrow.fs as pafs

    from aspkd_ray.generation.store import has_manifest, read_manifest

    lay = run_layout(cfg)
    fs, path = storage.resolve(join(lay.train, "attack"))
    rounds: list[int] = []

    def poll() -> tuple[int, int | None]:
        if not rounds and has_manifest(lay.proxy):
            rounds.append(num_rounds(cfg, len(read_manifest(lay.proxy)["class_names"])))
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        done = sum(i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")
                   for i in infos)
        return (min(done, rounds[0]), rounds[0]) if rounds else (done, None)

    return poll


def reference_baselines(scenario: str, method: str, path: Path = BENCHMARK) -> dict | None:
    """Agreement of the baselines (and of `method`) on `scenario` in the committed benchmark:
    mean, sample std and seeds per method; None when the file or the scenario is missing.
    Reference values: measured by scripts/bench_aspkd.py, not by this run."""
    if not path.is_file():
        return None
    bench = json.loads(path.read_text())
    methods = {}
    for name in (*REFERENCE_METHODS, method):
        runs = [r["agreement"] for r in bench.get("runs", [])
                if r.get("scenario") == scenario and r.get("method") == name]
        if runs:
            methods[name] = {"mean": round(statistics.mean(runs), 1),
                             "std": round(statistics.stdev(runs), 1) if len(runs) > 1 else 0.0,
                             "seeds": len(runs)}
    if not methods:
        return None
    return {"source": "scripts/results/aspkd.json (scripts/bench_aspkd.py; reference values, "
                      "not measured by this run)",
            "scenario": scenario, "calls_per_class": bench.get("calls_per_class"),
            "agreement": methods}


def publish_extras(cfg: Config, summary: dict) -> dict:
    """Add to the demo's finished run what the demo knows beyond run_steal: its own stage
    times (summary["wall_time_s"], set by the caller), the reference baselines and the proxy
    grid. Rewrites summary.json and logs all of it to the run's MLflow run. Returns the
    summary."""
    import mlflow

    from aspkd_ray.generation.grid import show_proxy_grid
    from aspkd_ray.tracking import mlflow_run

    lay = run_layout(cfg)
    with tempfile.TemporaryDirectory(prefix="aspkd-demo-") as tmp:
        summary["reference_baselines"] = reference_baselines(cfg.dataset.name,
                                                             summary["method"])
        show_proxy_grid(lay.proxy, Path(tmp) / GRID)
        summary["proxy_grid"] = join(lay.root, GRID)
        (Path(tmp) / "summary.json").write_text(json.dumps(summary, indent=2))
        files = {GRID: summary["proxy_grid"], "summary.json": lay.summary}
        with mlflow_run(cfg, "", run_id=summary["mlflow_run_id"]):
            for name, target in files.items():
                storage.write_bytes(*storage.resolve(target), (Path(tmp) / name).read_bytes())
                mlflow.log_artifact(str(Path(tmp) / name))  # replaces run_steal's summary
            mlflow.log_metrics({f"time_{k}_s": float(v)
                                for k, v in summary["wall_time_s"].items()})
            if summary["reference_baselines"]:
                mlflow.log_dict(summary["reference_baselines"], "reference_baselines.json")
                mlflow.log_metrics({f"reference_{m}_agreement": v["mean"] for m, v in
                                    summary["reference_baselines"]["agreement"].items()})
    return summary


def _reference_lines(summary: dict) -> list[str]:
    if "reference_baselines" not in summary:
        return []  # not a demo
    refs = summary["reference_baselines"]
    if not refs:
        return ["  reference baselines: none for this scenario (they come from "
                "scripts/results/aspkd.json, which ships with the repository)"]
    parts = [f"{name.replace('_', '-')} {v['mean']:.1f} ± {v['std']:.1f}%"
             for name, v in refs["agreement"].items()]
    seeds = max(v["seeds"] for v in refs["agreement"].values())
    at = refs["calls_per_class"]
    note = ("" if at is None or at == summary["calls_per_class"]
            else f"; this run used {summary['calls_per_class']:g}")
    return [f"  reference agreement (benchmark, {seeds} seeds at {at} calls per class{note}; "
            f"not run by this demo):", "    " + ", ".join(parts)]


def format_report(summary: dict, log_dir: str | Path | None = None) -> str:
    t = summary["wall_time_s"]
    rounds = ", ".join(f"{a:.1f}%" for a in summary["agreement_by_round"])
    lines = [
        "",
        f"ASPKD demo on {summary['dataset']} ({summary['method']}, "
        f"{summary['victim_output']}-label victim)",
        f"  agreement with the victim on its real test set: {summary['agreement']:.1f}%"
        f"  (by round: {rounds})",
        f"  teacher calls used: {summary['calls_used']} of {summary['budget']} "
        f"({summary['calls_per_class']:g} per class)",
    ]
    if summary.get("pretrain"):
        lines.append(f"  student init: pre-trained on the proxy set's generation classes, no "
                     f"calls ({summary['pretrain']['val_score']:.1f}% on proxy validation)")
    if summary.get("pseudo_label_agreement") is not None:
        lines.append(f"  pseudo-labels: {summary['pseudo_label_filter_rate'] * 100:.1f}% "
                     f"filtered out, {summary['pseudo_label_agreement']:.1f}% agree with the "
                     f"victim (diagnostic, never seen by the attack)")
    lines += _reference_lines(summary)
    lines.append("  time per stage: " + ", ".join(f"{k} {v:.0f}s" for k, v in t.items()))
    out = summary["output_dir"]
    plots = f"{out}/agreement.png" + (f", {summary['proxy_grid']}"
                                      if summary.get("proxy_grid") else "")
    lines += [f"  results: {out}/summary.json, plots {plots}",
              f"  MLflow run {summary['mlflow_run_id']}: mlflow ui --backend-store-uri "
              f"{summary['mlflow_uri']}"]
    if log_dir:
        lines.append(f"  logs (Ray's and this command's): {log_dir} (-v shows them here)")
    return "\n".join(lines)
