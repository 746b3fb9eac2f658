"""Benchmark of proxy data generation (issue 3's targets), written to scripts/results/.

1. Ray Data vs a plain loop: the same generator, plan and Parquet writing, once through Ray
   Data actors and once in a loop in this process (`executor="local"`), alternated, medians
   over --repeats; target: Ray within 15% of the loop.
2. Digits with a trained generator: time to generate >= 300 images per class through Ray
   Data; target: under 5 minutes on 2 cores.
3. Proxy quality: the share of proxy images the digits victim classifies as their generation
   class, for digits and digits-xdomain (an early probe got 87% and 26%).

Victim and generators are trained (and cached under --cache-dir) when missing: ~8 + 5 min.

    .venv/bin/python scripts/bench_generation.py            # all three
    .venv/bin/python scripts/bench_generation.py --images 500 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aspkd_ray.config import load  # noqa: E402
from aspkd_ray.generation import (  # noqa: E402
    ensure_generator,
    generate_proxy,
    load_proxy_set,
)
from aspkd_ray.generation.ddpm import read_info  # noqa: E402
from aspkd_ray.generation.store import read_table  # noqa: E402
from aspkd_ray.runtime import connect  # noqa: E402

log = logging.getLogger("bench_generation")


def config(name: str, cache: Path, *overrides: str):
    return load(ROOT / "tune_configs" / f"{name}.yaml", [f"cache_dir={cache}", *overrides])


def ensure_victim(cfg) -> tuple[Path, float]:
    from aspkd_ray.victim import train_victim, victim_checkpoint_dir

    folder = victim_checkpoint_dir(cfg)
    if not (folder / "model.safetensors").exists():
        log.info("training the victim (%s)", folder)
        train_victim(cfg, progress=False)
    return folder, json.loads((folder / "summary.json").read_text())["test_accuracy"]


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def ray_vs_loop(cfg, work: Path, repeats: int) -> dict:
    """Same config through Ray Data and through a plain loop in this process (torch's
    default threads, and one thread), interleaved; medians."""
    import torch

    default_threads = torch.get_num_threads()
    variants = {"ray": ("ray", default_threads), "loop": ("local", default_threads),
                "loop_1_thread": ("local", 1)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    outputs = {}
    for r in range(repeats):
        names = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in names:
            executor, threads = variants[name]
            out = work / f"{name}-{r}"
            shutil.rmtree(out, ignore_errors=True)
            torch.set_num_threads(threads)
            try:
                sec = timed(lambda out=out, ex=executor: generate_proxy(cfg, out, executor=ex))
            finally:
                torch.set_num_threads(default_threads)
            times[name].append(round(sec, 2))
            t = read_table(out / "proxy", columns=["sample_id", "png"])
            outputs[name] = (t.column("sample_id").to_pylist(), t.column("png").to_pylist())
            log.info("%s run %d: %.1f s", name, r, sec)
            shutil.rmtree(out, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    n = cfg.proxy.total
    best_loop = min(med["loop"], med["loop_1_thread"])
    return {"images": n, "repeats": repeats, "times_s": times, "median_s": med,
            "torch_default_threads": default_threads,
            "ratio_ray_over_loop": round(med["ray"] / med["loop"], 3),
            "ratio_ray_over_best_loop": round(med["ray"] / best_loop, 3),
            "images_per_s": {k: round(n / v, 1) for k, v in med.items()},
            "identical_ids": len({tuple(o[0]) for o in outputs.values()}) == 1,
            "identical_images": len({tuple(o[1]) for o in outputs.values()}) == 1,
            "target": "ratio <= 1.15"}


def quality(cfg, proxy_dir: Path, victim_dir: Path) -> dict:
    """Share of proxy images the victim puts in their generation class (and per class)."""
    import numpy as np

    from aspkd_ray.aspkd.distill import predict_logits
    from aspkd_ray.datasets import to_tensor
    from aspkd_ray.layout import input_shape
    from aspkd_ray.models import load_checkpoint

    proxy = load_proxy_set(proxy_dir)
    size, chans = input_shape(cfg)
    victim = load_checkpoint(victim_dir)
    pred = predict_logits(victim, to_tensor(proxy.images, size, chans)).argmax(1).numpy()
    hit = pred == proxy.classes
    per_class = {name: round(100 * float(hit[proxy.classes == k].mean()), 1)
                 for k, name in enumerate(proxy.class_names)}
    return {"images": len(proxy), "agreement_pct": round(100 * float(hit.mean()), 1),
            "per_class_pct": per_class,
            "predicted_histogram": np.bincount(pred, minlength=len(proxy.class_names)).tolist()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench-generation"))
    parser.add_argument("--cache-dir", default=None, help="default: <work>/cache")
    parser.add_argument("--images", type=int, default=3000,
                        help="images per Ray / loop run (default: the digits proxy set size)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=300)
    parser.add_argument("--skip-compare", action="store_true")
    parser.add_argument("--compare-only", action="store_true",
                        help="only the Ray / loop comparison, merged into an existing result")
    parser.add_argument("--worker-niceness", type=int, default=None,
                        help="RAY_worker_niceness for the embedded Ray (Ray runs its workers "
                             "at nice 15; on a shared machine 0 gives Ray and the loop equal "
                             "priority)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to use (default: a fresh embedded instance, so a "
                             "stale or shared local cluster cannot skew the figures)")
    parser.add_argument("--out", default=str(ROOT / "scripts" / "results" / "generation"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    work = Path(args.work).resolve()
    cache = Path(args.cache_dir).resolve() if args.cache_dir else work / "cache"
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    load_avg = [round(x, 2) for x in os.getloadavg()]
    if args.compare_only and out.with_suffix(".json").is_file():
        results = json.loads(out.with_suffix(".json").read_text())
    else:
        results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                               "load_avg_start": load_avg}}
    digits = config("digits", cache, f"proxy.per_class={args.per_class}")
    xdomain = config("digits-xdomain", cache, f"proxy.per_class={args.per_class}")
    victim_dir, victim_acc = ensure_victim(digits)
    results["victim"] = {"checkpoint": str(victim_dir), "test_accuracy_pct": victim_acc}
    for name, cfg in (("digits", digits), ("digits-xdomain", xdomain)):
        folder = ensure_generator(cfg)
        info = read_info(folder)
        results.setdefault("generators", {})[name] = {
            "folder": str(folder), "training_steps": cfg.generator.training.steps,
            "training_wall_time_s": info.get("wall_time_s"), "final_loss": info.get("final_loss")}
    if args.address is None:
        import ray

        if args.worker_niceness is not None:
            os.environ["RAY_worker_niceness"] = str(args.worker_niceness)
        ray.init(address="local", namespace="aspkd-bench", include_dashboard=False,
                 num_cpus=os.cpu_count())
    results["ray"] = connect(args.address, digits.ray.namespace)

    if not args.skip_compare:
        cmp_cfg = config("digits", cache, "proxy.per_class=null", f"proxy.total={args.images}")
        key = ("ray_vs_loop" if args.worker_niceness is None
               else f"ray_vs_loop_worker_niceness_{args.worker_niceness}")
        results[key] = ray_vs_loop(cmp_cfg, work / "compare", args.repeats)
        results[key]["load_avg"] = [load_avg, [round(x, 2) for x in os.getloadavg()]]
    if not args.compare_only:
        results["scenarios"] = scenarios(digits, xdomain, work, victim_dir, args.per_class)
        results["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]

    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text(report(results))
    print(report(results))
    return 0


def scenarios(digits, xdomain, work: Path, victim_dir: Path, per_class: int) -> dict:
    """Each embedded scenario's proxy set through Ray Data: time and quality."""
    found = {}
    for name, cfg in (("digits", digits), ("digits-xdomain", xdomain)):
        out = work / f"proxy-{name}"
        shutil.rmtree(out, ignore_errors=True)
        sec = timed(lambda cfg=cfg, out=out: generate_proxy(cfg, out))
        manifest = json.loads((out / "proxy" / "_manifest.json").read_text())
        found[name] = {"images": manifest["num_samples"], "per_class": per_class,
                       "generation_wall_time_s": round(sec, 1),
                       "images_per_s": round(manifest["num_samples"] / sec, 1),
                       "quality": quality(cfg, out / "proxy", victim_dir)}
        log.info("%s: %d images in %.1f s; victim agrees with the generation class on %.1f%%",
                 name, manifest["num_samples"], sec, found[name]["quality"]["agreement_pct"])
    found["digits"]["target"] = ">= 300 images per class in under 300 s"
    found["digits"]["meets_target"] = (per_class >= 300
                                       and found["digits"]["generation_wall_time_s"] < 300)
    return found


def report(r: dict) -> str:
    lines = ["# Proxy generation benchmark", "",
             f"Machine: {r['machine']['cpus']} CPUs, load average at start "
             f"{r['machine']['load_avg_start']} (shared machine), end "
             f"{r['machine'].get('load_avg_end')}. Command: "
             "`.venv/bin/python scripts/bench_generation.py`.", ""]
    for key in sorted(k for k in r if k.startswith("ray_vs_loop")):
        c = r[key]
        m = c["median_s"]
        nice = key.rpartition("_")[2] if "niceness" in key else "15 (Ray's default)"
        lines += [f"## Ray Data vs a plain loop: Ray worker niceness {nice}", "",
                  f"{c['images']} digits images (same generator, plan and Parquet writing), "
                  f"medians of {c['repeats']} interleaved runs, load average "
                  f"{c.get('load_avg')}: Ray Data {m['ray']} s, plain loop {m['loop']} s "
                  f"(torch's {c['torch_default_threads']} threads), plain loop with 1 thread "
                  f"{m['loop_1_thread']} s. Ratio Ray / loop **{c['ratio_ray_over_loop']}**, "
                  f"Ray / best loop **{c['ratio_ray_over_best_loop']}** (target <= 1.15). "
                  f"Same ids: {c['identical_ids']}; byte-identical images: "
                  f"{c['identical_images']}. All runs (s): {c['times_s']}.", ""]
    lines += ["## Scenarios (Ray Data, trained generators)", "",
              "| scenario | generator training | images | generation | victim agrees with "
              "generation class |", "|---|---|---|---|---|"]
    for name, s in r["scenarios"].items():
        g = r["generators"][name]
        lines.append(f"| {name} | {g['training_steps']} steps, {g['training_wall_time_s']} s | "
                     f"{s['images']} | {s['generation_wall_time_s']} s "
                     f"({s['images_per_s']} img/s) | **{s['quality']['agreement_pct']}%** |")
    lines += ["", f"Victim test accuracy: {r['victim']['test_accuracy_pct']:.1f}%. Probe "
                  f"reference (an early probe): 87% digits, 26% digits-xdomain.", ""]
    for name, s in r["scenarios"].items():
        lines.append(f"Per class, {name}: {s['quality']['per_class_pct']}")
    lines += ["", "## Reading the figures", "",
              "- The machine is shared with other jobs, so wall times swing by 2-4x between "
              "runs; runs are interleaved and medians reported.",
              "- Ray starts its workers at nice 15: under contention they get less CPU than "
              "the loop (nice 0). `--worker-niceness 0` measures Ray Data itself at equal "
              "priority; on a dedicated node niceness does not matter.",
              "- Torch's OpenMP threads stall when the cores are oversubscribed (the 2-thread "
              "loop took 113-424 s for the same work); the Ray pool uses single-threaded "
              "actors for the small DDPM, one per free CPU.",
              "- Ray's fixed cost (actor processes importing torch/diffusers, loading the "
              "model) is a few seconds: it matters for tiny runs, not for a proxy set."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
