"""Generating the proxy set with Ray Data: pending shards → generator actors → Parquet.

The shards still to make go to Ray Data as one row each; `map_batches` runs them on a pool of
`GeneratorActor`s (each loads its model once; one GPU per actor where the cluster has GPUs,
fractional CPUs otherwise, the pool sized from what Ray reports). An actor generates a whole
shard, in the plan's generator batches, and writes it itself, atomically, straight to the
proxy folder (a local path, or a URI such as s3://bucket/run/proxy), then returns one small
row (shard, rows, a digest of its ids, the node that wrote it). The driver never receives an
image and needs no disk of its own: it writes `_plan.json` first and `_manifest.json` last,
after reading back every shard's ids. A rerun skips the shards already there, so an
interrupted run resumes; an actor lost with its node is restarted by Ray Data and its shard
made again (the same images: each is fixed by its sample's seed and its batch).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from pathlib import Path

import pyarrow as pa

from aspkd_ray import storage
from aspkd_ray.config import Config, config_hash
from aspkd_ray.errors import UserError
from aspkd_ray.generation import store
from aspkd_ray.generation.plan import SPLITS, SamplePlan, class_names_for, make_plan
from aspkd_ray.generation.registry import check_generator, get_generator
from aspkd_ray.layout import join
from aspkd_ray.runtime import WorkerPlan, plan_workers
from aspkd_ray.runtime.resources import check_placeable

log = logging.getLogger(__name__)

EXECUTORS = ("ray", "local")
RESERVE_CPUS = 0.5  # for the driver and Ray Data's own tasks


def ids_digest(ids: list[str]) -> str:
    """What an actor reports of a shard's ids: the driver checks it against the plan."""
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


class GeneratorActor:
    """Ray Data callable class: loads the generator once; for each shard index it is given,
    generates the shard's images and writes the shard to the proxy folder."""

    def __init__(self, cfg: Config, plan: SamplePlan, proxy_dir: str, image_size: int,
                 channels: int, in_ray: bool = True) -> None:
        from aspkd_ray.generation.backends import build_generator

        self.node = "local"
        if in_ray:
            import ray

            from aspkd_ray.runtime.resources import match_torch_threads

            match_torch_threads()
            self.node = ray.get_runtime_context().get_node_id()
        self.generate = build_generator(cfg, plan.class_names)
        self.plan, self.batch_size = plan, cfg.generator.batch_size
        self.proxy = store.open_dir(proxy_dir)  # resolved once (an S3 client per actor)
        self.size, self.channels, self.frame = image_size, channels, cfg.proxy.frame

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [self._shard(int(k)) for k in batch.column("shard").to_pylist()]
        return pa.table({
            "shard": pa.array([r[0] for r in rows], pa.int64()),
            "rows": pa.array([r[1] for r in rows], pa.int64()),
            "ids_sha256": pa.array([r[2] for r in rows], pa.string()),
            "node": pa.array([self.node] * len(rows), pa.string()),
            "seconds": pa.array([r[3] for r in rows], pa.float64()),
        })

    def _shard(self, k: int) -> tuple[int, int, str, float]:
        from aspkd_ray.datasets import png_encode
        from aspkd_ray.generation.backends import to_victim_format

        t0 = time.time()
        sl = self.plan.shard_slice(k)
        cols = self.plan.rows(sl)
        pngs: list[bytes] = []
        # The plan's generator batches, from the shard's start: a resumed shard is batched
        # (so its images are) exactly as in an uninterrupted run.
        for start in range(0, sl.stop - sl.start, self.batch_size):
            part = slice(start, min(start + self.batch_size, sl.stop - sl.start))
            images = self.generate(cols["prompt"][part].tolist(),
                                   cols["class_id"][part].tolist(),
                                   cols["seed"][part].tolist())
            if len(images) != part.stop - part.start:
                raise RuntimeError(f"the generator returned {len(images)} images for "
                                   f"{part.stop - part.start} prompts; expected one per "
                                   f"prompt.")
            pngs += [png_encode(img)
                     for img in to_victim_format(images, self.size, self.channels, self.frame)]
        ids = cols["sample_id"].tolist()
        n = len(ids)
        table = pa.table({
            "sample_id": pa.array(ids, pa.string()),
            "class_id": pa.array(cols["class_id"], pa.int64()),
            "class_name": pa.array(cols["class_name"].tolist(), pa.string()),
            "prompt": pa.array(cols["prompt"].tolist(), pa.string()),
            "seed": pa.array(cols["seed"], pa.int64()),
            "generator": pa.array([self.plan.generator] * n, pa.string()),
            "png": pa.array(pngs, pa.binary()),
            "split": pa.array(cols["split"].tolist(), pa.string()),
        })
        store.write_shard(self.proxy, k, table, writer=self.node)
        return k, n, ids_digest(ids), time.time() - t0


def plan_pool(cfg: Config) -> WorkerPlan:
    """Actors and per-actor resources from what the cluster reports (never constants).

    GPUs: one actor per GPU. CPUs only: a small model (a kind with `one_actor_per_cpu`, the
    embedded DDPM) gets one single-threaded actor per free CPU (several single-threaded
    processes beat one multi-threaded one at 16 x 16, and stay fast when the cores are
    shared, where OpenMP threads stall); any other kind (a text-to-image pipeline, a plugin)
    gets one actor per node (one copy of a large model per node, all its threads). Requests
    are fractional and leave RESERVE_CPUS for the driver and Ray Data, as whole-CPU actors
    plus a Ray Data task deadlock on 2 CPUs. Without ray.cpus_per_worker, an actor never
    asks for more CPUs than the smallest node with CPUs has: on a cluster of unequal nodes,
    an actor that fits on no node would wait forever.
    """
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    use_gpu = cfg.ray.use_gpu if cfg.ray.use_gpu is not None else total.get("GPU", 0) >= 1
    free_cpu = free.get("CPU", total.get("CPU", 1.0))
    resources = {"CPU": free_cpu, "GPU": total.get("GPU", 0.0)}
    nodes = [n["Resources"]["CPU"] for n in ray.nodes()
             if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
    requested = cfg.ray.generation_actors
    if not use_gpu and requested is None:
        if get_generator(cfg.generator.kind).one_actor_per_cpu:
            requested = max(1, int(free_cpu - RESERVE_CPUS + 0.5))
        else:
            requested = max(1, len(nodes))
    pool = plan_workers(requested=requested, use_gpu=use_gpu, reserve_cpus=RESERVE_CPUS,
                        cpus_per_worker=cfg.ray.cpus_per_worker, resources=resources,
                        autoscale=cfg.ray.autoscale)
    if nodes and cfg.ray.cpus_per_worker is None and pool.cpus > min(nodes):
        pool = dataclasses.replace(pool, cpus=float(min(nodes)))
    # Fail now, naming the keys, rather than wait forever for actors no node can hold.
    check_placeable(pool, autoscale=cfg.ray.autoscale, what="proxy generation",
                    keys="ray.generation_actors, ray.cpus_per_worker, ray.use_gpu")
    return pool


def proxy_config_hash(cfg: Config, plan: SamplePlan, size: int, channels: int) -> str:
    """What fixes the proxy set's content (not batch sizes or Ray settings)."""
    g, p = cfg.generator, cfg.proxy
    proxy = {"per_class": p.per_class, "total": p.total, "balanced": p.balanced,
             "val_fraction": p.val_fraction}  # not proxy.dir: where it lives is no content
    if p.frame is not None:  # only when set: sets made before the option keep their hash
        proxy["frame"] = p.frame
    return config_hash({"generator": plan.generator, "kind": g.kind, "templates": g.templates,
                        "proxy": proxy, "seed": cfg.seed,
                        "dataset": cfg.dataset.name, "size": size, "channels": channels,
                        "class_names": list(plan.class_names)})


class ProxyMismatch(UserError, ValueError):
    """The proxy folder holds another config's proxy set."""


class GeneratorMissing(UserError, FileNotFoundError):
    """The configured generator is not there (an untrained DDPM folder)."""


def _resolved(cfg: Config) -> Config:
    """The config as actors see it (they may run elsewhere than the driver's folder): the
    kind's checks, then its paths made absolute (registry.py)."""
    check_generator(cfg)
    return get_generator(cfg.generator.kind).resolve(cfg)


class _Progress:
    """The driver's view of a run: the small rows actors return, checked against the plan."""

    def __init__(self, plan: SamplePlan, proxy: store.ProxyDir, shards: list[int]) -> None:
        self.plan, self.proxy = plan, proxy
        self.pending, self.nodes = set(shards), set()
        self.total, self.images, self.t0 = len(shards), 0, time.time()

    def add(self, table: pa.Table) -> None:
        for row in table.to_pylist():
            k = int(row["shard"])
            ids = self.plan.sample_id[self.plan.shard_slice(k)].tolist()
            if row["ids_sha256"] != ids_digest(ids):
                raise store.ProxyCorrupt(f"proxy shard {self.proxy.show(store.shard_name(k))}"
                                         f" was written with ids that do not match the plan; "
                                         f"rerun `aspkd generate` to regenerate it.")
            self.nodes.add(row["node"])
            if k not in self.pending:  # a retried task wrote it again: the same bytes
                log.debug("proxy shard %d reported again (a retried task)", k)
                continue
            self.pending.discard(k)
            self.images += int(row["rows"])
            done = self.total - len(self.pending)
            log.info("proxy shard %d written (%d/%d this run, %.1f images/s)", k, done,
                     self.total, self.images / max(time.time() - self.t0, 1e-9))

    def check_done(self) -> None:
        if self.pending:
            missing = sorted(self.pending)
            raise store.ProxyCorrupt(f"generation ended with shards {missing[:10]} of "
                                     f"{self.proxy.show()} not written; rerun `aspkd "
                                     f"generate` to resume.")


def _run_ray(cfg: Config, shards: list[int], progress: _Progress, ctor: dict) -> None:
    import ray
    from ray.data import ActorPoolStrategy

    from aspkd_ray.runtime import connect

    if not ray.is_initialized():  # Ray Data would start a default instance otherwise
        connect(cfg.ray.address, cfg.ray.namespace)
    pool = plan_pool(cfg)
    size = min(pool.num, len(shards))  # no idle actors loading a model for nothing
    log.info("generating %d shards on %d actor(s) with %.2f CPU and %g GPU each", len(shards),
             size, pool.cpus, pool.gpus)
    # Explicit requests, so that the pool fits the nodes it was sized for. An actor lost with
    # its node is restarted and its shards made again (Ray Data's actor defaults: restarts
    # and task retries without limit); a shard written twice is the same whole file.
    remote = {"num_cpus": pool.cpus, "num_gpus": pool.gpus or None}
    # One block and one batch per shard: a shard is owned by one task, and shards spread
    # over the actors however Ray Data bundles blocks.
    blocks = [pa.table({"shard": pa.array([k], pa.int64())}) for k in shards]
    ds = ray.data.from_arrow(blocks).map_batches(
        GeneratorActor, fn_constructor_kwargs=ctor, batch_format="pyarrow", batch_size=1,
        compute=ActorPoolStrategy(size=size), **remote)
    for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        progress.add(table)


def _run_local(shards: list[int], progress: _Progress, ctor: dict) -> None:
    actor = GeneratorActor(**ctor, in_ray=False)
    for k in shards:
        progress.add(actor(pa.table({"shard": pa.array([k], pa.int64())})))


def _verify(plan: SamplePlan, proxy: store.ProxyDir) -> None:
    """Every planned id exactly once, in the shard it belongs to; nothing else. Reads only
    the sample_id column of each shard."""
    expected = {store.shard_name(k) for k in range(plan.num_shards)}
    stray = [proxy.show(n) for n in store.shard_names(proxy) if n not in expected]
    if stray:
        raise store.ProxyCorrupt(f"{proxy.show()} holds shards outside the plan: {stray[:3]}; "
                                 f"remove them (or the folder) and rerun `aspkd generate`.")
    for k in range(plan.num_shards):
        name = store.shard_name(k)
        if store.shard_ids(proxy, k) != plan.sample_id[plan.shard_slice(k)].tolist():
            raise store.ProxyCorrupt(f"proxy shard {proxy.show(name)} is missing or does not "
                                     f"match the plan; rerun `aspkd generate` to regenerate "
                                     f"it.")


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


def _open_plan(cfg: Config, proxy: store.ProxyDir, shard_size: int | None, size: int,
               channels: int) -> tuple[SamplePlan, str]:
    """The plan, with the shard size recorded by the folder's first run; refuses a folder
    that holds another config's proxy set."""
    record = _read_plan_record(proxy)
    if record is not None:
        shard_size = record["shard_size"]
    plan = make_plan(cfg, class_names_for(cfg), shard_size)
    chash = proxy_config_hash(cfg, plan, size, channels)
    if record is None:
        store.write_json_at(proxy, store.PLAN, {"config_hash": chash,
                                              "shard_size": plan.shard_size,
                                              "num_samples": len(plan),
                                              "generator": plan.generator})
    elif record["config_hash"] != chash:
        raise ProxyMismatch(f"{proxy.show()} holds a proxy set of another config (hash "
                            f"{record['config_hash']}, this one {chash}); use another "
                            f"--output-dir or delete {proxy.show()}.")
    return plan, chash


def _read_plan_record(proxy: store.ProxyDir) -> dict | None:
    """The folder's plan record, or None when there is none. An unreadable one is dropped
    (with a warning): every shard is then checked against a fresh plan, and the ones that do
    not match it are regenerated, so nothing of another config is kept."""
    if not store.exists(proxy, store.PLAN):
        return None
    try:
        record = store.read_json_at(proxy, store.PLAN, "proxy plan")
        if isinstance(record.get("shard_size"), int) and record["shard_size"] >= 1 \
                and isinstance(record.get("config_hash"), str):
            return record
        problem = "it lacks shard_size or config_hash"
    except store.ProxyCorrupt as exc:
        problem = str(exc).split(";")[0]
    log.warning("%s: %s; writing a new plan and checking every shard against it",
                proxy.show(store.PLAN), problem)
    store.delete(proxy, store.PLAN)
    return None


def _pending_shards(plan: SamplePlan, proxy: store.ProxyDir) -> list[int]:
    """Shards still to generate: missing, or not matching the plan (then removed)."""
    names = set(storage.list_files(proxy.fs, proxy.path))
    for tmp in sorted(n for n in names if n.endswith(".tmp")):  # an interrupted local write
        store.delete(proxy, tmp)
    pending = []
    for k in range(plan.num_shards):
        name = store.shard_name(k)
        if name in names:
            if store.shard_ids(proxy, k) == plan.sample_id[plan.shard_slice(k)].tolist():
                continue
            log.warning("shard %s does not match the plan; regenerating it",
                        proxy.show(name))
            store.delete(proxy, name)
        pending.append(k)
    return pending


def generate_proxy(cfg: Config, out_dir: str | Path, *, shard_size: int | None = None,
                   executor: str = "ray") -> dict:
    """Generate (or finish) the proxy set in `out_dir/proxy/` (a local folder or a URI such
    as s3://bucket/run); return its manifest. See `generate_proxy_at`."""
    return generate_proxy_at(cfg, join(storage.normalize(str(out_dir)), "proxy"),
                             shard_size=shard_size, executor=executor)


def generate_proxy_at(cfg: Config, proxy_dir: str | Path, *, shard_size: int | None = None,
                      executor: str = "ray") -> dict:
    """Generate (or finish) the proxy set in the folder `proxy_dir` (a local path, or a URI:
    `aspkd_ray.layout.run_layout(cfg).proxy`); return its manifest.

    Connect to Ray first (`aspkd_ray.runtime.connect`). The generator actors write the
    shards themselves, so on a cluster `proxy_dir` must be storage every node reaches (object
    storage, or a shared mount). `shard_size` (images per Parquet file) is fixed by the first
    run of a folder. `executor="local"` runs the same actor class in this process, without
    Ray (debugging, benchmarks).
    """
    from aspkd_ray.layout import input_shape

    if executor not in EXECUTORS:
        raise ValueError(f"executor: got {executor!r}; expected one of: {', '.join(EXECUTORS)}.")
    t0 = time.time()
    proxy = store.open_dir(storage.normalize(str(proxy_dir)))
    size, channels = input_shape(cfg)
    plan, chash = _open_plan(cfg, proxy, shard_size, size, channels)
    pending = _pending_shards(plan, proxy)
    nodes: set[str] = set()
    if pending:
        store.delete(proxy, store.MANIFEST)
        log.info("proxy set: %d images in %d shards, %d to generate (%s) in %s", len(plan),
                 plan.num_shards, len(pending), plan.generator, proxy.show())
        ctor = {"cfg": _resolved(cfg), "plan": plan, "proxy_dir": proxy.location,
                "image_size": size, "channels": channels}
        progress = _Progress(plan, proxy, pending)
        if executor == "ray":
            _run_ray(cfg, pending, progress, ctor)
        else:
            _run_local(pending, progress, ctor)
        progress.check_done()
        nodes = progress.nodes
    _verify(plan, proxy)
    if not pending and store.has_manifest(proxy):
        try:
            return store.read_manifest(proxy)
        except store.ProxyCorrupt as exc:  # every shard checked above: write it again
            log.warning("%s; writing it again", str(exc).split(";")[0])
    manifest = _manifest(cfg, plan, chash, size, channels)
    generated = sum(plan.shard_slice(k).stop - plan.shard_slice(k).start for k in pending)
    manifest["run"] = {"generated": int(generated), "wall_time_s": round(time.time() - t0, 2),
                       "executor": executor, "writer_nodes": len(nodes)}
    store.write_json_at(proxy, store.MANIFEST, manifest)
    return manifest
