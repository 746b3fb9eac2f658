"""The proxy set on disk: Parquet shards, the plan record, the manifest, and loading.

Layout of `<out>/proxy/`:
  part-00000.parquet ...  one file per fixed block of sample indices (written tmp + rename,
                          so a file that exists is complete)
  _plan.json              written first: config hash, shard size, sample count; a rerun with
                          another config is refused instead of mixing two proxy sets
  _manifest.json          written last, only when every shard is there and checked: counts
                          per class and split, generator, config hash
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from aspkd_ray.errors import UserError

# The contract other stages read: names, order and types.
SCHEMA = pa.schema([
    ("sample_id", pa.string()),
    ("class_id", pa.int64()),
    ("class_name", pa.string()),
    ("prompt", pa.string()),
    ("seed", pa.int64()),
    ("generator", pa.string()),
    ("png", pa.binary()),
    ("split", pa.string()),
])
MANIFEST = "_manifest.json"
PLAN = "_plan.json"
FORMAT_VERSION = 1
REGENERATE = ("rerun `aspkd generate` with this run's --config and --set options (it "
              "regenerates missing or bad shards and rewrites the manifest)")


class ProxyMissing(UserError, FileNotFoundError):
    """No complete proxy set where one was expected (no manifest)."""


class ProxyCorrupt(UserError, ValueError):
    """A proxy set file is missing, unreadable (truncated, overwritten) or does not match the
    manifest. The message names the file; `aspkd generate` repairs the set."""


def shard_path(proxy_dir: str | Path, k: int) -> Path:
    return Path(proxy_dir) / f"part-{k:05d}.parquet"


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def write_shard(proxy_dir: str | Path, k: int, table: pa.Table) -> Path:
    """Write shard k atomically (tmp file, fsync, rename): it exists only when complete."""
    table = table.select(SCHEMA.names).cast(SCHEMA)
    path = shard_path(proxy_dir, k)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    tmp.replace(path)
    return path


def read_shard_ids(path: str | Path) -> list[str] | None:
    """The sample ids in a shard, or None when the file is unreadable or of another schema."""
    try:
        pf = pq.ParquetFile(path)
        if not pf.schema_arrow.equals(SCHEMA):
            return None
        return pf.read(columns=["sample_id"]).column(0).to_pylist()
    except (OSError, pa.ArrowException):
        return None


def shard_files(proxy_dir: str | Path) -> list[Path]:
    return sorted(Path(proxy_dir).glob("part-*.parquet"))


def read_json(path: Path, what: str) -> dict:
    """A JSON object from `path`; ProxyCorrupt naming the file when it is not one."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProxyCorrupt(f"{what} {path} is unreadable ({type(exc).__name__}: {exc}); "
                           f"{REGENERATE}.") from None
    if not isinstance(data, dict):
        raise ProxyCorrupt(f"{what} {path} holds a {type(data).__name__}, not a JSON object; "
                           f"{REGENERATE}.")
    return data


def read_manifest(proxy_dir: str | Path) -> dict:
    path = Path(proxy_dir) / MANIFEST
    if not path.is_file():
        raise ProxyMissing(f"{path} not found: {proxy_dir} holds no complete proxy set; "
                           f"run `aspkd generate` (it resumes an interrupted run).")
    manifest = read_json(path, "proxy manifest")
    missing = [k for k in ("num_samples", "num_shards", "shard_size") if k not in manifest]
    if missing:
        raise ProxyCorrupt(f"proxy manifest {path} lacks {', '.join(missing)}; {REGENERATE}.")
    return manifest


@dataclass
class ProxySet:
    """A proxy set in memory, rows sorted by sample id."""

    ids: np.ndarray        # str
    classes: np.ndarray    # int64, the generation class y''
    split: np.ndarray      # str, 'train' or 'val'
    images: np.ndarray     # uint8, N x H x W x C at the victim's input size
    prompts: np.ndarray    # str
    seeds: np.ndarray      # int64
    class_names: tuple[str, ...] = ()
    manifest: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)


def read_shard(path: Path, columns: list[str] | None = None) -> pa.Table:
    """One shard; ProxyCorrupt naming the file when it is missing, unreadable or of another
    schema (a truncated, overwritten or foreign file)."""
    if not path.is_file():
        raise ProxyCorrupt(f"proxy shard {path} is missing; {REGENERATE}.")
    try:
        table = pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowException) as exc:
        raise ProxyCorrupt(f"proxy shard {path} is unreadable (truncated or not Parquet: "
                           f"{exc}); {REGENERATE}.") from None
    if columns is None and not table.schema.equals(SCHEMA):
        raise ProxyCorrupt(f"proxy shard {path} has columns {table.schema.names}, not the "
                           f"proxy schema {SCHEMA.names}; it was not written by this version "
                           f"of aspkd; {REGENERATE}.")
    return table


def read_table(proxy_dir: str | Path, columns: list[str] | None = None,
               num_shards: int | None = None) -> pa.Table:
    """All shards as one table, sorted by sample id. With `num_shards` (the manifest's), every
    shard 0..num_shards-1 must be there and nothing else."""
    if num_shards is None:
        files = shard_files(proxy_dir)
    else:
        files = [shard_path(proxy_dir, k) for k in range(num_shards)]
        stray = sorted(set(shard_files(proxy_dir)) - set(files))
        if stray:
            raise ProxyCorrupt(f"proxy shard {stray[0]} is not in the manifest of "
                               f"{proxy_dir}; remove it, or {REGENERATE}.")
    if not files:
        raise ProxyMissing(f"no part-*.parquet files in {proxy_dir}; {REGENERATE}.")
    tables = [read_shard(path, columns) for path in files]
    table = pa.concat_tables(tables)
    return table.sort_by("sample_id")


def check_files(proxy_dir: str | Path) -> dict:
    """A cheap check of a complete proxy set before a run relies on it; returns the manifest.

    The manifest must be readable, and every shard it lists there (and no other), with a
    readable Parquet footer (a truncated or overwritten file has none), the proxy schema and
    the planned number of rows. Reads no images: seconds of work are saved for the full
    checks of `load_proxy_set`, which names the file at fault too.
    """
    proxy_dir = Path(proxy_dir)
    manifest = read_manifest(proxy_dir)
    size, total = int(manifest["shard_size"]), int(manifest["num_samples"])
    expected = [shard_path(proxy_dir, k) for k in range(int(manifest["num_shards"]))]
    stray = sorted(set(shard_files(proxy_dir)) - set(expected))
    if stray:
        raise ProxyCorrupt(f"proxy shard {stray[0]} is not in the manifest of {proxy_dir}; "
                           f"remove it, or {REGENERATE}.")
    for k, path in enumerate(expected):
        if not path.is_file():
            raise ProxyCorrupt(f"proxy shard {path} is missing; {REGENERATE}.")
        try:
            with pq.ParquetFile(path) as pf:
                rows, schema = pf.metadata.num_rows, pf.schema_arrow
        except (OSError, pa.ArrowException) as exc:
            raise ProxyCorrupt(f"proxy shard {path} is unreadable (truncated or not Parquet: "
                               f"{exc}); {REGENERATE}.") from None
        if not schema.equals(SCHEMA):
            raise ProxyCorrupt(f"proxy shard {path} has columns {schema.names}, not the proxy "
                               f"schema {SCHEMA.names}; {REGENERATE}.")
        want = min(size, total - k * size)
        if rows != want:
            raise ProxyCorrupt(f"proxy shard {path} holds {rows} rows, the manifest expects "
                               f"{want}; {REGENERATE}.")
    return manifest


def _check_rows(proxy_dir: Path, manifest: dict, table: pa.Table) -> None:
    """Row counts per shard and distinct ids, against the manifest; names the bad shard."""
    size, total = int(manifest["shard_size"]), int(manifest["num_samples"])
    seen: dict[str, Path] = {}
    for k in range(int(manifest["num_shards"])):
        path = shard_path(proxy_dir, k)
        ids = read_shard(path, ["sample_id"]).column(0).to_pylist()
        expected = min(size, total - k * size)
        if len(ids) != expected:
            raise ProxyCorrupt(f"proxy shard {path} holds {len(ids)} rows, the manifest "
                               f"expects {expected}; {REGENERATE}.")
        for i in ids:
            if i in seen:
                raise ProxyCorrupt(f"proxy shard {path} repeats sample {i} of {seen[i]} "
                                   f"(a shard copied over another?); {REGENERATE}.")
            seen[i] = path


def load_proxy_set(proxy_dir: str | Path) -> ProxySet:
    """Load a complete proxy set (its manifest must exist) with images decoded."""
    from aspkd_ray.datasets import png_decode

    proxy_dir = Path(proxy_dir)
    manifest = read_manifest(proxy_dir)
    t = read_table(proxy_dir, num_shards=int(manifest["num_shards"]))
    ids = np.asarray(t.column("sample_id").to_pylist(), dtype=object)
    if len(ids) != manifest["num_samples"] or len(set(ids.tolist())) != len(ids):
        _check_rows(proxy_dir, manifest, t)  # names the shard at fault
        raise ProxyCorrupt(f"{proxy_dir}: {len(ids)} rows ({len(set(ids.tolist()))} distinct) "
                           f"but the manifest lists {manifest['num_samples']} samples; "
                           f"{REGENERATE}.")
    pngs = t.column("png").to_pylist()
    try:
        images = (np.stack([png_decode(b) for b in pngs]) if pngs
                  else np.zeros((0, 1, 1, 1), np.uint8))
    except (OSError, ValueError) as exc:  # PIL: not a PNG, or images of different sizes
        raise ProxyCorrupt(f"{proxy_dir}: a proxy image cannot be decoded ({exc}); "
                           f"{REGENERATE}.") from None
    return ProxySet(
        ids=ids.astype(str),
        classes=t.column("class_id").to_numpy().astype(np.int64),
        split=np.asarray(t.column("split").to_pylist()).astype(str),
        images=images,
        prompts=np.asarray(t.column("prompt").to_pylist()).astype(str),
        seeds=t.column("seed").to_numpy().astype(np.int64),
        class_names=tuple(manifest.get("class_names", ())),
        manifest=manifest,
    )
