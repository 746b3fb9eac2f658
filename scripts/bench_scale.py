"""Benchmark: memory and time of one attack round against the proxy pool's size.

Pools of class-coloured shapes (the `shapes` generator plugin) at 224 x 224 RGB, 10 classes,
2k / 20k / 100k images; a small student (`patch_cnn`, input 224 px) and a victim of the same
architecture with random weights (what it answers does not matter here, only that it is
asked); 8 calls per class in one round, one epoch per fit, `pool.memory_mb` at its default.
Each attack is one `aspkd steal` process with its own embedded Ray; its process tree is
sampled every 0.2 s (psutil) and each process's peak RSS kept:
- driver: the `aspkd steal` process;
- worker: the largest Ray Train worker (rank 0 also holds the pool's latents, reported
  separately as `latents_mb`);
- embed actor: the largest Ray Data latent actor (stream path).
`round_wall_s` is round 1's time inside the round loop; `attack_wall_s` adds Ray Train's
start-up and the teacher service. The in-memory path runs where it fits in this machine's
memory (at 20k it needs a 12 GB float pool in the driver and again in the object store).

    .venv/bin/python scripts/bench_scale.py       # writes benchmarks/scale.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("circle", "square", "triangle", "cross", "star", "ring", "bar", "diamond",
           "arrow", "moon")
MB = 2 ** 20


def scenario(work: Path, size: int) -> Path:
    """The config of a pool of `size` images (written once)."""
    root = work / "classes"
    for split in ("train", "test"):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True, exist_ok=True)
    _test_images(root)
    text = f"""
seed: 0
cache_dir: {work / 'cache'}
dataset: {{name: imagefolder, root: {root}, image_size: 224, channels: 3}}
victim: {{architecture: patch_cnn, checkpoint: {work / 'victim'}, output: soft}}
generator:
  kind: plugin
  plugin: "aspkd_ray.generation.shapes:shapes"
  resolution: 224
  batch_size: 64
proxy: {{per_class: {size // len(CLASSES)}, val_fraction: 0.15, dir: {work / f'pool-{size}'}}}
student: {{architecture: patch_cnn, pretrain: none}}
budget: {{calls_per_class: 8}}
aspkd: {{rounds: 1, sigma: 1.0, sigma_mode: median}}
training: {{max_epochs: 1, early_stopping: none, batch_size: 64}}
"""
    path = work / f"scale-{size}.yaml"
    path.write_text(text)
    return path


def _test_images(root: Path) -> None:
    """A few test images per class (the evaluation oracle's test split)."""
    import numpy as np
    from PIL import Image

    from aspkd_ray.config import GeneratorConfig
    from aspkd_ray.generation.shapes import shapes

    gen = shapes(GeneratorConfig(resolution=224), CLASSES, "cpu")
    for c, name in enumerate(CLASSES):
        folder = root / "test" / name
        if any(folder.iterdir()):
            continue
        for i, img in enumerate(gen([""] * 4, [c] * 4, [10_000 + 4 * c + i for i in range(4)])):
            Image.fromarray(np.asarray(img)).save(folder / f"{i}.png")
            Image.fromarray(np.asarray(img)).save(root / "train" / name / f"{i}.png")


def victim(work: Path) -> None:
    from aspkd_ray.models import create_model, save_checkpoint

    if (work / "victim" / "model.json").exists():
        return
    import torch

    torch.manual_seed(0)
    save_checkpoint(create_model("patch_cnn", num_classes=len(CLASSES), in_chans=3,
                                 image_size=224), work / "victim")


def aspkd(*args: str) -> list[str]:
    return [str(ROOT / ".venv/bin/aspkd"), *args]


class Sampler(threading.Thread):
    """Peak RSS of every process in a process tree, sampled."""

    def __init__(self, pid: int, every: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.root, self.every, self.peaks, self.kinds = psutil.Process(pid), every, {}, {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                break
            for p in procs:
                try:
                    rss = p.memory_info().rss
                    if p.pid not in self.kinds or self.kinds[p.pid] == "other":
                        self.kinds[p.pid] = _kind(p, self.root.pid)
                except psutil.Error:
                    continue
                self.peaks[p.pid] = max(self.peaks.get(p.pid, 0), rss)
            time.sleep(self.every)

    def peak(self, kind: str) -> float | None:
        found = [v for pid, v in self.peaks.items() if self.kinds.get(pid) == kind]
        return round(max(found) / MB, 1) if found else None


def _kind(p: psutil.Process, driver: int) -> str:
    if p.pid == driver:
        return "driver"
    cmd = " ".join(p.cmdline())
    if "RayTrainWorker" in cmd:
        return "worker"
    if "MapWorker" in cmd or "ShardEncoder" in cmd:
        return "embed"
    return "other"


def measure(config: Path, size: int, path: str, work: Path) -> dict:
    out = work / "runs" / f"{size}-{path}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = aspkd("steal", "--config", str(config), "--output-dir", str(out),
                "--set", f"pool.mode={path}", "--set", f"ray.teacher_service=scale-{size}")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # an embedded Ray
    t = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    sampler = Sampler(proc.pid)
    sampler.start()
    log, _ = proc.communicate()
    sampler.done.set()
    sampler.join()
    row = {"pool_size": size, "path": path, "driver_peak_rss_mb": sampler.peak("driver"),
           "worker_peak_rss_mb": sampler.peak("worker"),
           "embed_actor_peak_rss_mb": sampler.peak("embed"), "wall_s": round(time.time() - t, 1)}
    if proc.returncode != 0:
        (work / f"{size}-{path}.log").write_text(log)
        return {**row, "status": f"failed (exit {proc.returncode}): {log.strip()[-300:]}"}
    summary = json.loads((out / "summary.json").read_text())
    first = summary["rounds"][0]
    return {**row, "status": "ok", "round_wall_s": first.get("round_time_s"),
            "attack_wall_s": summary["wall_time_s"].get("attack"),
            "latents_mb": first.get("latents_mb"), "calls_used": summary["calls_used"],
            "pool_mode": summary.get("pool_mode")}


def generate(config: Path, size: int, work: Path) -> float:
    if (work / f"pool-{size}" / "proxy" / "_manifest.json").exists():
        return 0.0
    t = time.time()
    subprocess.run(aspkd("generate", "--config", str(config), "--output-dir",
                         str(work / "runs" / f"gen-{size}")), check=True,
                   stdout=subprocess.DEVNULL)
    return round(time.time() - t, 1)


NUMERIC = ("driver_peak_rss_mb", "worker_peak_rss_mb", "embed_actor_peak_rss_mb", "latents_mb",
           "round_wall_s", "attack_wall_s", "wall_s")


def medians(rows: list[dict]) -> list[dict]:
    """One row per (pool size, path): the median of each measure over its repeats."""
    import statistics

    out = []
    for key in dict.fromkeys((r["pool_size"], r["path"]) for r in rows):
        group = [r for r in rows if (r["pool_size"], r["path"]) == key]
        ok = [r for r in group if r["status"] == "ok"]
        row = {"pool_size": key[0], "path": key[1], "runs": len(ok),
               "status": "ok" if ok else group[0]["status"]}
        for m in NUMERIC:
            values = [r[m] for r in ok if r.get(m) is not None]
            row[m] = round(statistics.median(values), 2) if values else None
        out.append(row)
    return out


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Memory and time of one attack round against the pool size", "",
        f"Machine: {meta['machine']}. Command: `{meta['command']}` ({meta['date']}).", "",
        "Pools of 224 x 224 RGB shapes (10 classes), student and victim `patch_cnn` at 224 px, "
        "80 calls in one round, one epoch per fit, `pool.memory_mb` 1024 (default). Peak RSS "
        "per process, sampled every 0.2 s (psutil); worker = the Ray Train worker (rank 0, "
        "which also holds the latents), embed = the Ray Data latent actor. Medians over the "
        "runs (both paths alternated); `steal s` is the whole `aspkd steal` process.", "",
        "| pool | path | runs | driver peak RSS MB | worker peak RSS MB | embed actor MB | "
        "latents MB | round s | attack s | steal s | status |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in medians(rows):
        lines.append(f"| {r['pool_size']:,} | {r['path']} | {r['runs']} | "
                     f"{r.get('driver_peak_rss_mb')} | {r.get('worker_peak_rss_mb')} | "
                     f"{r.get('embed_actor_peak_rss_mb')} | {r.get('latents_mb')} | "
                     f"{r.get('round_wall_s')} | {r.get('attack_wall_s')} | {r.get('wall_s')} | "
                     f"{r['status']} |")
    lines += ["", "## Targets", ""]
    for line in meta["targets"]:
        lines.append(f"- {line}")
    if meta.get("generation_s"):
        lines += ["", "Generation of each pool (shapes plugin, Ray Data actors): " + ", ".join(
            f"{k}: {v} s" for k, v in meta["generation_s"].items()) + "."]
    return "\n".join(lines) + "\n"


def targets(rows: list[dict]) -> list[str]:
    ok = {(r["pool_size"], r["path"]): r for r in medians(rows) if r["status"] == "ok"}
    out = []
    sizes = sorted({s for s, p in ok if p == "stream"})
    if len(sizes) >= 2:
        lo, hi = ok[(sizes[0], "stream")], ok[(sizes[-1], "stream")]
        for key, name in (("driver_peak_rss_mb", "driver"), ("worker_peak_rss_mb", "worker")):
            if lo.get(key) and hi.get(key):
                # The latents are reported apart: take them out of rank 0's worker.
                lat = (hi.get("latents_mb") or 0) - (lo.get("latents_mb") or 0) \
                    if key == "worker_peak_rss_mb" else 0
                ratio = (hi[key] - lat) / lo[key]
                out.append(f"{name} peak RSS, stream path, {sizes[-1]:,} vs {sizes[0]:,} images"
                           f"{' (latents aside)' if lat else ''}: x{ratio:.2f} (target <= 1.5: "
                           f"{'met' if ratio <= 1.5 else 'missed'})")
    small = sizes[0] if sizes else None
    if small and (small, "memory") in ok:
        m, s = ok[(small, "memory")], ok[(small, "stream")]
        ratio = s["round_wall_s"] / m["round_wall_s"]
        out.append(f"round wall time at {small:,} images, stream / memory (medians of "
                   f"{s['runs']}): x{ratio:.2f} (target <= 1.2: "
                   f"{'met' if ratio <= 1.2 else 'missed'}); the whole attack "
                   f"x{s['attack_wall_s'] / m['attack_wall_s']:.2f}, the whole steal "
                   f"x{s['wall_s'] / m['wall_s']:.2f} (the in-memory path decodes the pool "
                   f"before the round, the streamed one in it)")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000, 100000])
    p.add_argument("--memory-path-max", type=int, default=2000,
                   help="largest pool run on the in-memory path too")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs of each path where both run (medians reported)")
    p.add_argument("--work", default="/tmp/aspkd-scale", help="pools and runs (large)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "scale"))
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    victim(work)
    rows, gen = [], {}
    for size in args.sizes:
        config = scenario(work, size)
        gen[f"{size:,}"] = generate(config, size, work)
        paths = ["memory", "stream"] if size <= args.memory_path_max else ["stream"]
        for repeat in range(args.repeats if len(paths) > 1 else 1):
            for path in paths:  # alternated, so both see the same machine
                row = {**measure(config, size, path, work), "repeat": repeat}
                print(json.dumps(row), flush=True)
                rows.append(row)
        for size_path in paths:  # the runs' folders are large; the pools are kept
            shutil.rmtree(work / "runs" / f"{size}-{size_path}", ignore_errors=True)
    skipped = [s for s in args.sizes if s > args.memory_path_max]
    for size in skipped:
        need = size * 224 * 224 * 3 * 4 / 2**30
        rows.append({"pool_size": size, "path": "memory",
                     "status": f"not run: the float pool alone is {need:.0f} GB, held in the "
                               f"driver and again in the object store "
                               f"({psutil.virtual_memory().total / 2**30:.0f} GB here)"})
    meta = {"machine": f"{platform.machine()}, {psutil.cpu_count()} CPUs, "
                       f"{psutil.virtual_memory().total / 2**30:.0f} GB, no GPU",
            "command": "python scripts/bench_scale.py " + " ".join(sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d"), "generation_s": gen,
            "targets": targets(rows)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    out.with_suffix(".md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
