"""Generating the proxy set with Ray Data: plan rows → generator actors → Parquet shards.

The plan's rows (index, class, prompt, seed, ...) go to Ray Data as blocks of one generator
batch each; `map_batches` runs them on a pool of `GeneratorActor`s (each loads its model
once; one GPU per actor where the cluster has GPUs, fractional CPUs otherwise, the pool sized
from what Ray reports). The driver collects the rows shard by shard and writes each shard
atomically as soon as it is complete. A rerun skips the shards already on disk, so an
interrupted run resumes; the manifest is written only after every shard is checked against
the plan (no duplicates, no gaps).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aspkd_ray.config import Config, ConfigError, config_hash
from aspkd_ray.errors import UserError
from aspkd_ray.generation import store
from aspkd_ray.generation.plan import SPLITS, SamplePlan, class_names_for, make_plan
from aspkd_ray.runtime import WorkerPlan, plan_workers

log = logging.getLogger(__name__)

EXECUTORS = ("ray", "local")
RESERVE_CPUS = 0.5  # for the driver (it writes the shards) and Ray Data's own tasks


class GeneratorActor:
    """Ray Data callable class: loads the generator once, turns plan rows into images."""

    def __init__(self, cfg: Config, class_names: tuple[str, ...], image_size: int,
                 channels: int, generator: str, in_ray: bool = True) -> None:
        import torch

        from aspkd_ray.generation.backends import build_generator

        if in_ray:  # as many threads as CPUs this actor was given (at least one)
            import ray

            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0)
            if cpus:
                torch.set_num_threads(max(1, int(cpus + 0.5)))
        self.generate = build_generator(cfg, class_names)
        self.size, self.channels, self.generator = image_size, channels, generator

    def __call__(self, batch: pa.Table) -> pa.Table:
        from aspkd_ray.datasets import png_encode
        from aspkd_ray.generation.backends import to_victim_format

        pngs: list[bytes] = [b""] * batch.num_rows
        chunks = batch.column("chunk").to_numpy()
        # A chunk is one planned generator batch; keeping it whole keeps batching (and so
        # images) identical between a fresh and a resumed run.
        for chunk in np.unique(chunks):
            rows = np.flatnonzero(chunks == chunk)
            part = batch.take(pa.array(rows))
            images = self.generate(part.column("prompt").to_pylist(),
                                   part.column("class_id").to_pylist(),
                                   part.column("seed").to_pylist())
            if len(images) != len(rows):
                raise RuntimeError(f"the generator returned {len(images)} images for "
                                   f"{len(rows)} prompts; expected one per prompt.")
            for r, img in zip(rows, to_victim_format(images, self.size, self.channels),
                              strict=True):
                pngs[r] = png_encode(img)
        return pa.table({
            "index": batch.column("index"),
            "sample_id": batch.column("sample_id"),
            "class_id": batch.column("class_id"),
            "class_name": batch.column("class_name"),
            "prompt": batch.column("prompt"),
            "seed": batch.column("seed"),
            "generator": pa.array([self.generator] * batch.num_rows, pa.string()),
            "png": pa.array(pngs, pa.binary()),
            "split": batch.column("split"),
        })


def plan_pool(cfg: Config) -> WorkerPlan:
    """Actors and per-actor resources from what the cluster reports (never constants).

    GPUs: one actor per GPU. CPUs only: the small embedded DDPM gets one single-threaded
    actor per free CPU (several single-threaded processes beat one multi-threaded one at
    16 x 16, and stay fast when the cores are shared, where OpenMP threads stall); a
    text-to-image pipeline or plugin gets one actor per node (one copy of a large model per
    node, all its threads). Requests are fractional and leave RESERVE_CPUS for the driver
    and Ray Data, as whole-CPU actors plus a Ray Data task deadlock on 2 CPUs.
    """
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    use_gpu = cfg.ray.use_gpu if cfg.ray.use_gpu is not None else total.get("GPU", 0) >= 1
    free_cpu = free.get("CPU", total.get("CPU", 1.0))
    resources = {"CPU": free_cpu, "GPU": total.get("GPU", 0.0)}
    requested = cfg.ray.generation_actors
    if not use_gpu and requested is None:
        if cfg.generator.kind == "ddpm":
            requested = max(1, int(free_cpu - RESERVE_CPUS + 0.5))
        else:
            nodes = [n for n in ray.nodes()
                     if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
            requested = max(1, len(nodes))
    return plan_workers(requested=requested, use_gpu=use_gpu, reserve_cpus=RESERVE_CPUS,
                        cpus_per_worker=cfg.ray.cpus_per_worker, resources=resources)


def proxy_config_hash(cfg: Config, plan: SamplePlan, size: int, channels: int) -> str:
    """What fixes the proxy set's content (not batch sizes or Ray settings)."""
    g, p = cfg.generator, cfg.proxy
    proxy = {"per_class": p.per_class, "total": p.total, "balanced": p.balanced,
             "val_fraction": p.val_fraction}  # not proxy.dir: where it lives is no content
    return config_hash({"generator": plan.generator, "kind": g.kind, "templates": g.templates,
                        "proxy": proxy, "seed": cfg.seed,
                        "dataset": cfg.dataset.name, "size": size, "channels": channels,
                        "class_names": list(plan.class_names)})


class ProxyMismatch(UserError, ValueError):
    """The proxy folder holds another config's proxy set."""


class GeneratorMissing(UserError, FileNotFoundError):
    """The configured generator is not there (an untrained DDPM folder)."""


def check_plugin(spec: str) -> None:
    """Fail early, in the driver and before Ray starts, when generator.plugin cannot load:
    a missing or unparsable .py file, or a module that is not installed. Runs none of the
    plugin's code (a file is only compiled; a module is only looked up)."""
    import importlib.util

    target, _, attr = spec.rpartition(":")
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_file():
            raise ConfigError(f"generator.plugin: got {spec!r}, but {path} is not a file; "
                              f"expected '/path/to/file.py:factory' or "
                              f"'package.module:factory'.")
        try:
            compile(path.read_bytes(), str(path), "exec")
        except (SyntaxError, ValueError) as exc:
            raise ConfigError(f"generator.plugin: {path} is not valid Python ({exc}); fix "
                              f"the file.") from None
        return
    try:
        found = importlib.util.find_spec(target)
    except (ImportError, ValueError) as exc:  # a parent package is missing or broken
        found, why = None, f"{type(exc).__name__}: {exc}"
    else:
        why = "no such module"
    if found is None:
        raise ConfigError(f"generator.plugin: got {spec!r}, but module {target!r} cannot be "
                          f"imported ({why}); install it on every Ray node, or give "
                          f"'/path/to/file.py:{attr or 'factory'}'.")


def check_generator(cfg: Config) -> None:
    """The checks of the configured generator that need no model loading (see check_plugin)."""
    if cfg.generator.kind == "plugin":
        check_plugin(cfg.generator.plugin)


def _resolved(cfg: Config) -> Config:
    """Paths made absolute: actors may run elsewhere than the driver's folder."""
    from aspkd_ray.generation.ddpm import is_ready
    from aspkd_ray.generation.train_ddpm import generator_dir

    check_generator(cfg)
    g = cfg.generator
    if g.kind == "ddpm":
        folder = generator_dir(cfg).resolve()
        if not is_ready(folder):
            raise GeneratorMissing(f"no trained generator at {folder}; run `aspkd "
                                   f"train-generator` with this config first.")
        g = dataclasses.replace(g, model=str(folder))
    elif g.kind == "diffusers" and Path(g.model).exists():
        g = dataclasses.replace(g, model=str(Path(g.model).resolve()))
    elif g.kind == "plugin":
        target, _, attr = g.plugin.rpartition(":")
        if target.endswith(".py"):
            g = dataclasses.replace(g, plugin=f"{Path(target).resolve()}:{attr}")
    return dataclasses.replace(cfg, generator=g)


def _blocks(plan: SamplePlan, shards: list[int], batch_size: int) -> list[pa.Table]:
    """One Arrow table per planned generator batch (a 'chunk'), never crossing a shard."""
    blocks = []
    for k in shards:
        sl = plan.shard_slice(k)
        for start in range(sl.start, sl.stop, batch_size):
            part = slice(start, min(start + batch_size, sl.stop))
            cols = plan.rows(part)
            blocks.append(pa.table({
                "index": pa.array(cols["index"], pa.int64()),
                "chunk": pa.array(np.full(part.stop - part.start, start), pa.int64()),
                "sample_id": pa.array(cols["sample_id"].tolist(), pa.string()),
                "class_id": pa.array(cols["class_id"], pa.int64()),
                "class_name": pa.array(cols["class_name"].tolist(), pa.string()),
                "prompt": pa.array(cols["prompt"].tolist(), pa.string()),
                "seed": pa.array(cols["seed"], pa.int64()),
                "split": pa.array(cols["split"].tolist(), pa.string()),
            }))
    return blocks


class _ShardWriter:
    """Collects generated rows (in any order) and writes each shard once it is complete."""

    def __init__(self, plan: SamplePlan, proxy_dir: Path, shards: list[int]) -> None:
        self.plan, self.proxy_dir = plan, proxy_dir
        self.parts: dict[int, list[pa.Table]] = {k: [] for k in shards}
        self.rows = dict.fromkeys(shards, 0)
        self.done: set[int] = set()
        self.total, self.written, self.images, self.t0 = len(shards), 0, 0, time.time()

    def add(self, table: pa.Table) -> None:
        shard = pc.divide(table.column("index"), self.plan.shard_size)
        for k in np.unique(shard.to_numpy()).tolist():
            if k not in self.parts:
                what = "already written" if k in self.done else "not requested in this run"
                raise RuntimeError(f"generated rows for shard {k}, {what}: duplicates.")
            part = table.filter(pc.equal(shard, k))
            self.parts[k].append(part)
            self.rows[k] += part.num_rows
            sl = self.plan.shard_slice(k)
            if self.rows[k] == sl.stop - sl.start:
                self._write(k)

    def _write(self, k: int) -> None:
        sl = self.plan.shard_slice(k)
        table = pa.concat_tables(self.parts.pop(k)).sort_by("index")
        if table.column("sample_id").to_pylist() != self.plan.sample_id[sl].tolist():
            raise RuntimeError(f"shard {k}: generated rows do not match the plan "
                               f"(duplicates or gaps); nothing was written for it.")
        store.write_shard(self.proxy_dir, k, table)
        self.done.add(k)
        self.written += 1
        self.images += table.num_rows
        log.info("proxy shard %d written (%d/%d this run, %.1f images/s)", k, self.written,
                 self.total, self.images / max(time.time() - self.t0, 1e-9))

    def check_done(self) -> None:
        if self.parts:
            missing = sorted(self.parts)
            raise store.ProxyCorrupt(f"generation ended with shards {missing[:10]} of "
                                     f"{self.proxy_dir} incomplete; rerun `aspkd generate` to "
                                     f"resume.")


def _run_ray(cfg: Config, blocks: list[pa.Table], writer: _ShardWriter, ctor: dict) -> None:
    import ray
    from ray.data import ActorPoolStrategy

    from aspkd_ray.runtime import connect

    if not ray.is_initialized():  # Ray Data would start a default instance otherwise
        connect(cfg.ray.address, cfg.ray.namespace)
    pool = plan_pool(cfg)
    size = min(pool.num, len(blocks))  # no idle actors loading a model for nothing
    log.info("generating %d batches on %d actor(s) with %.2f CPU and %g GPU each", len(blocks),
             size, pool.cpus, pool.gpus)
    remote = {"num_cpus": pool.cpus}
    if pool.gpus:
        remote["num_gpus"] = pool.gpus
    ds = ray.data.from_arrow(blocks).map_batches(
        GeneratorActor, fn_constructor_kwargs=ctor, batch_format="pyarrow",
        batch_size=cfg.generator.batch_size, compute=ActorPoolStrategy(size=size),
        **remote)
    for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        writer.add(table)


def _run_local(blocks: list[pa.Table], writer: _ShardWriter, ctor: dict) -> None:
    actor = GeneratorActor(**ctor, in_ray=False)
    for block in blocks:
        writer.add(actor(block))


def _verify(plan: SamplePlan, proxy_dir: Path) -> None:
    """Every planned id exactly once, in the shard it belongs to; nothing else."""
    expected = {store.shard_path(proxy_dir, k) for k in range(plan.num_shards)}
    stray = [p for p in store.shard_files(proxy_dir) if p not in expected]
    if stray:
        raise store.ProxyCorrupt(f"{proxy_dir} holds shards outside the plan: {stray[:3]}; "
                                 f"remove them (or the folder) and rerun `aspkd generate`.")
    for k in range(plan.num_shards):
        path = store.shard_path(proxy_dir, k)
        ids = store.read_shard_ids(path)
        if ids != plan.sample_id[plan.shard_slice(k)].tolist():
            raise store.ProxyCorrupt(f"proxy shard {path} is missing or does not match the "
                                     f"plan; rerun `aspkd generate` to regenerate it.")


def _manifest(cfg: Config, plan: SamplePlan, chash: str, size: int, channels: int) -> dict:
    names = plan.class_names
    counts = {s: {n: int(((plan.class_id == k) & (plan.split == s)).sum())
                  for k, n in enumerate(names)} for s in SPLITS}
    return {
        "format": store.FORMAT_VERSION,
        "num_samples": len(plan),
        "num_classes": len(names),
        "class_names": list(names),
        "per_class": {n: int((plan.class_id == k).sum()) for k, n in enumerate(names)},
        "counts": counts,
        "splits": {s: int((plan.split == s).sum()) for s in SPLITS},
        "generator": plan.generator,
        "generator_kind": cfg.generator.kind,
        "templates": list(cfg.generator.templates),
        "image_size": size,
        "channels": channels,
        "seed": cfg.seed,
        "balanced": cfg.proxy.balanced,
        "val_fraction": cfg.proxy.val_fraction,
        "shard_size": plan.shard_size,
        "num_shards": plan.num_shards,
        "config_hash": chash,
    }


def _open_plan(cfg: Config, proxy_dir: Path, shard_size: int | None, size: int,
               channels: int) -> tuple[SamplePlan, str]:
    """The plan, with the shard size recorded by the folder's first run; refuses a folder
    that holds another config's proxy set."""
    plan_file = proxy_dir / store.PLAN
    record = _read_plan_record(plan_file)
    if record is not None:
        shard_size = record["shard_size"]
    plan = make_plan(cfg, class_names_for(cfg), shard_size)
    chash = proxy_config_hash(cfg, plan, size, channels)
    if record is None:
        store.write_json(plan_file, {"config_hash": chash, "shard_size": plan.shard_size,
                                     "num_samples": len(plan), "generator": plan.generator})
    elif record["config_hash"] != chash:
        raise ProxyMismatch(f"{proxy_dir} holds a proxy set of another config (hash "
                            f"{record['config_hash']}, this one {chash}); use another "
                            f"--output-dir or delete {proxy_dir}.")
    return plan, chash


def _read_plan_record(plan_file: Path) -> dict | None:
    """The folder's plan record, or None when there is none. An unreadable one is dropped
    (with a warning): every shard is then checked against a fresh plan, and the ones that do
    not match it are regenerated, so nothing of another config is kept."""
    if not plan_file.is_file():
        return None
    try:
        record = store.read_json(plan_file, "proxy plan")
        if isinstance(record.get("shard_size"), int) and record["shard_size"] >= 1 \
                and isinstance(record.get("config_hash"), str):
            return record
        problem = "it lacks shard_size or config_hash"
    except store.ProxyCorrupt as exc:
        problem = str(exc).split(";")[0]
    log.warning("%s: %s; writing a new plan and checking every shard against it",
                plan_file, problem)
    plan_file.unlink()
    return None


def _pending_shards(plan: SamplePlan, proxy_dir: Path) -> list[int]:
    """Shards still to generate: missing, or not matching the plan (then removed)."""
    for tmp in proxy_dir.glob("*.tmp"):  # left by an interrupted write
        tmp.unlink()
    pending = []
    for k in range(plan.num_shards):
        path = store.shard_path(proxy_dir, k)
        if path.exists():
            if store.read_shard_ids(path) == plan.sample_id[plan.shard_slice(k)].tolist():
                continue
            log.warning("shard %s does not match the plan; regenerating it", path.name)
            path.unlink()
        pending.append(k)
    return pending


def generate_proxy(cfg: Config, out_dir: str | Path, *, shard_size: int | None = None,
                   executor: str = "ray") -> dict:
    """Generate (or finish) the proxy set in `out_dir/proxy/`; return its manifest.

    Connect to Ray first (`aspkd_ray.runtime.connect`). `shard_size` (images per Parquet
    file) is fixed by the first run of an output folder. `executor="local"` runs the same
    actor class in this process, without Ray (debugging, benchmarks).
    """
    from aspkd_ray.victim.train import input_shape

    if executor not in EXECUTORS:
        raise ValueError(f"executor: got {executor!r}; expected one of: {', '.join(EXECUTORS)}.")
    t0 = time.time()
    proxy_dir = Path(out_dir) / "proxy"
    proxy_dir.mkdir(parents=True, exist_ok=True)
    size, channels = input_shape(cfg)
    plan, chash = _open_plan(cfg, proxy_dir, shard_size, size, channels)
    pending = _pending_shards(plan, proxy_dir)
    manifest_path = proxy_dir / store.MANIFEST
    if pending:
        manifest_path.unlink(missing_ok=True)
        log.info("proxy set: %d images in %d shards, %d to generate (%s)", len(plan),
                 plan.num_shards, len(pending), plan.generator)
        ctor = {"cfg": _resolved(cfg), "class_names": plan.class_names, "image_size": size,
                "channels": channels, "generator": plan.generator}
        blocks = _blocks(plan, pending, cfg.generator.batch_size)
        writer = _ShardWriter(plan, proxy_dir, pending)
        if executor == "ray":
            _run_ray(cfg, blocks, writer, ctor)
        else:
            _run_local(blocks, writer, ctor)
        writer.check_done()
    _verify(plan, proxy_dir)
    if not pending and manifest_path.is_file():
        try:
            return store.read_manifest(proxy_dir)
        except store.ProxyCorrupt as exc:  # every shard checked above: write it again
            log.warning("%s; writing it again", str(exc).split(";")[0])
    manifest = _manifest(cfg, plan, chash, size, channels)
    generated = sum(plan.shard_slice(k).stop - plan.shard_slice(k).start for k in pending)
    manifest["run"] = {"generated": int(generated), "wall_time_s": round(time.time() - t0, 2),
                       "executor": executor}
    store.write_json(manifest_path, manifest)
    return manifest
