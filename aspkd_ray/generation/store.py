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


def read_manifest(proxy_dir: str | Path) -> dict:
    path = Path(proxy_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {proxy_dir} holds no complete proxy set; "
                                f"run `aspkd generate` (it resumes an interrupted run).")
    return json.loads(path.read_text())


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


def read_table(proxy_dir: str | Path, columns: list[str] | None = None) -> pa.Table:
    """All shards as one table, sorted by sample id."""
    files = shard_files(proxy_dir)
    if not files:
        raise FileNotFoundError(f"no part-*.parquet files in {proxy_dir}.")
    tables = []
    for path in files:
        t = pq.read_table(path, columns=columns)
        if columns is None and not t.schema.equals(SCHEMA):
            raise ValueError(f"{path}: schema {t.schema} differs from the proxy schema "
                             f"{SCHEMA}; it was not written by this version of aspkd.")
        tables.append(t)
    table = pa.concat_tables(tables)
    return table.sort_by("sample_id")


def load_proxy_set(proxy_dir: str | Path) -> ProxySet:
    """Load a complete proxy set (its manifest must exist) with images decoded."""
    from aspkd_ray.datasets import png_decode

    proxy_dir = Path(proxy_dir)
    manifest = read_manifest(proxy_dir)
    t = read_table(proxy_dir)
    ids = np.asarray(t.column("sample_id").to_pylist(), dtype=object)
    if len(ids) != manifest["num_samples"] or len(set(ids.tolist())) != len(ids):
        raise ValueError(f"{proxy_dir}: {len(ids)} rows ({len(set(ids.tolist()))} distinct) "
                         f"but the manifest lists {manifest['num_samples']} samples; "
                         f"regenerate it with `aspkd generate`.")
    pngs = t.column("png").to_pylist()
    images = np.stack([png_decode(b) for b in pngs]) if pngs else np.zeros((0, 1, 1, 1),
                                                                           np.uint8)
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
