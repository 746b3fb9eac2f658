"""The proxy set in storage: Parquet shards, the plan record, the manifest, and loading.

The proxy folder is a local path or any pyarrow filesystem URI (`s3://bucket/run/proxy`);
every read and write goes through `aspkd_ray.storage`. Its layout:
  part-00000.parquet ...  one file per fixed block of sample indices, written atomically by
                          the generator actor that made it (a local temporary name and a
                          rename; one PUT on object storage), so a file that exists is complete
  _plan.json              written first: config hash, shard size, sample count; a rerun with
                          another config is refused instead of mixing two proxy sets
  _manifest.json          written last, only when every shard is there and checked: counts
                          per class and split, generator, config hash
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from aspkd_ray import storage
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
SHARD_PREFIX, SHARD_SUFFIX = "part-", ".parquet"
WRITER_KEY = b"aspkd.writer"  # Parquet key-value metadata: the Ray node that wrote a shard
FORMAT_VERSION = 1
REGENERATE = ("rerun `aspkd generate` with this run's --config and --set options (it "
              "regenerates missing or bad shards and rewrites the manifest)")


class ProxyMissing(UserError, FileNotFoundError):
    """No complete proxy set where one was expected (no manifest)."""


class ProxyCorrupt(UserError, ValueError):
    """A proxy set file is missing, unreadable (truncated, overwritten) or does not match the
    manifest. The message names the file; `aspkd generate` repairs the set."""


class ShardMissing(ProxyCorrupt, ProxyMissing):
    """A shard the manifest lists is not there: a damaged set (ProxyCorrupt, as always) and
    a missing file (ProxyMissing), whichever a caller catches."""


@dataclass(frozen=True)
class ProxyDir:
    """A proxy folder, resolved once: its filesystem, the path inside it, and the location as
    given (a local path, or a URI that may carry a ?query of filesystem options)."""

    fs: pafs.FileSystem
    path: str
    location: str

    def file(self, name: str) -> str:
        """`name`'s path inside the filesystem."""
        return f"{self.path.rstrip('/')}/{name}"

    def at(self, name: str) -> str:
        """`name`'s location (a path or URI another call can open)."""
        if not storage.is_uri(self.location):
            return str(Path(self.location) / name)
        base, _, query = self.location.partition("?")
        return f"{base.rstrip('/')}/{name}" + (f"?{query}" if query else "")

    def show(self, name: str = "") -> str:
        """How messages name the folder or a file in it: the path as given, or the URI
        without its ?query (options there may hold credentials)."""
        if not storage.is_uri(self.location):
            return str(Path(self.location) / name) if name else self.location
        base = self.location.partition("?")[0].rstrip("/")
        return f"{base}/{name}" if name else base


Where = str | Path | ProxyDir


def open_dir(proxy_dir: Where) -> ProxyDir:
    """The proxy folder at a local path (str or Path) or a URI."""
    if isinstance(proxy_dir, ProxyDir):
        return proxy_dir
    location = str(proxy_dir)
    fs, path = storage.resolve(location)
    return ProxyDir(fs, path, location)


def _split(location: str | Path) -> tuple[ProxyDir, str]:
    """(folder, base name) of a file's location."""
    location = str(location)
    if not storage.is_uri(location):
        path = Path(location)
        return open_dir(path.parent), path.name
    base, _, query = location.partition("?")
    folder, _, name = base.rstrip("/").rpartition("/")
    return open_dir(folder + (f"?{query}" if query else "")), name


def shard_name(k: int) -> str:
    return f"{SHARD_PREFIX}{k:05d}{SHARD_SUFFIX}"


def shard_path(proxy_dir: Where, k: int) -> str:
    """Shard k's location: a local path, or a URI for a proxy folder on object storage."""
    return open_dir(proxy_dir).at(shard_name(k))


def exists(proxy_dir: Where, name: str) -> bool:
    """Whether file `name` is in the proxy folder (e.g. MANIFEST: a complete set is there)."""
    d = open_dir(proxy_dir)
    return storage.exists(d.fs, d.file(name))


def has_manifest(proxy_dir: Where) -> bool:
    return exists(proxy_dir, MANIFEST)


def delete(proxy_dir: Where, name: str) -> None:
    d = open_dir(proxy_dir)
    storage.delete(d.fs, d.file(name))


def write_json(path: str | Path, data: dict) -> None:
    """Write a JSON file atomically (a local temporary name and a rename; one PUT)."""
    d, name = _split(path)
    write_json_at(d, name, data)


def write_json_at(proxy_dir: Where, name: str, data: dict) -> None:
    """Write JSON file `name` of the proxy folder atomically."""
    d = open_dir(proxy_dir)
    storage.write_bytes(d.fs, d.file(name), json.dumps(data, indent=2).encode())


def write_shard(proxy_dir: Where, k: int, table: pa.Table,
                writer: str | None = None) -> str:
    """Write shard k atomically: it exists only when complete, and a reader of a shard that
    two actors wrote (a retried task) sees one whole file. `writer` (the Ray node id) goes in
    the file's key-value metadata. Returns the shard's location."""
    d = open_dir(proxy_dir)
    table = table.select(SCHEMA.names).cast(SCHEMA)
    if writer:
        table = table.replace_schema_metadata({WRITER_KEY: writer.encode()})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(d.fs, d.file(shard_name(k)), buf.getvalue(), sync=True)
    return d.at(shard_name(k))


@contextmanager
def _open_parquet(d: ProxyDir, name: str) -> Iterator[pq.ParquetFile]:
    """A shard's Parquet file (random access: on object storage, ranged reads of the footer
    and the columns asked for, not the whole object)."""
    with d.fs.open_input_file(d.file(name)) as f:
        yield pq.ParquetFile(f)


def shard_ids(proxy_dir: Where, k: int) -> list[str] | None:
    """Shard k's sample ids (only that column is read), or None when the file is missing,
    unreadable or of another schema."""
    return _shard_ids(open_dir(proxy_dir), shard_name(k))


def _shard_ids(d: ProxyDir, name: str) -> list[str] | None:
    try:
        with _open_parquet(d, name) as pf:
            if not pf.schema_arrow.equals(SCHEMA):
                return None
            return pf.read(columns=["sample_id"]).column(0).to_pylist()
    except (OSError, pa.ArrowException):
        return None


def read_shard_ids(path: str | Path) -> list[str] | None:
    """The sample ids in a shard, or None when the file is missing, unreadable or of another
    schema."""
    return _shard_ids(*_split(path))


def shard_writer(path: str | Path) -> str | None:
    """The Ray node id recorded by the actor that wrote a shard (None: not recorded)."""
    d, name = _split(path)
    with _open_parquet(d, name) as pf:
        meta = pf.schema_arrow.metadata or {}
    value = meta.get(WRITER_KEY)
    return value.decode() if value else None


def shard_names(proxy_dir: Where) -> list[str]:
    """The base names of the shard files in the proxy folder, sorted."""
    d = open_dir(proxy_dir)
    return [n for n in storage.list_files(d.fs, d.path)
            if n.startswith(SHARD_PREFIX) and n.endswith(SHARD_SUFFIX)]


def shard_files(proxy_dir: Where) -> list[str]:
    """The locations of the shard files in the proxy folder, sorted."""
    d = open_dir(proxy_dir)
    return [d.at(n) for n in shard_names(d)]


def read_json_at(proxy_dir: Where, name: str, what: str) -> dict:
    """JSON file `name` of the proxy folder; ProxyCorrupt naming it when it is not an
    object."""
    d = open_dir(proxy_dir)
    try:
        data = json.loads(storage.read_bytes(d.fs, d.file(name)).decode())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProxyCorrupt(f"{what} {d.show(name)} is unreadable ({type(exc).__name__}: "
                           f"{exc}); {REGENERATE}.") from None
    if not isinstance(data, dict):
        raise ProxyCorrupt(f"{what} {d.show(name)} holds a {type(data).__name__}, not a JSON "
                           f"object; {REGENERATE}.")
    return data


def read_json(path: str | Path, what: str) -> dict:
    """A JSON object from `path`; ProxyCorrupt naming the file when it is not one."""
    return read_json_at(*_split(path), what)


def read_manifest(proxy_dir: Where) -> dict:
    d = open_dir(proxy_dir)
    if not storage.exists(d.fs, d.file(MANIFEST)):
        raise ProxyMissing(f"{d.show(MANIFEST)} not found: {d.show()} holds no complete proxy "
                           f"set; run `aspkd generate` (it resumes an interrupted run).")
    manifest = read_json_at(d, MANIFEST, "proxy manifest")
    missing = [k for k in ("num_samples", "num_shards", "shard_size") if k not in manifest]
    if missing:
        raise ProxyCorrupt(f"proxy manifest {d.show(MANIFEST)} lacks {', '.join(missing)}; "
                           f"{REGENERATE}.")
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


def _read_shard(d: ProxyDir, name: str, columns: list[str] | None = None) -> pa.Table:
    shown = d.show(name)
    if not storage.exists(d.fs, d.file(name)):
        raise ShardMissing(f"proxy shard {shown} is missing; {REGENERATE}.")
    try:
        with _open_parquet(d, name) as pf:
            table = pf.read(columns=columns)
    except (OSError, pa.ArrowException) as exc:
        raise ProxyCorrupt(f"proxy shard {shown} is unreadable (truncated or not Parquet: "
                           f"{exc}); {REGENERATE}.") from None
    if columns is None and not table.schema.equals(SCHEMA):
        raise ProxyCorrupt(f"proxy shard {shown} has columns {table.schema.names}, not the "
                           f"proxy schema {SCHEMA.names}; it was not written by this version "
                           f"of aspkd; {REGENERATE}.")
    return table


def read_shard(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """One shard; ProxyCorrupt naming the file when it is missing, unreadable or of another
    schema (a truncated, overwritten or foreign file)."""
    return _read_shard(*_split(path), columns)


def _stray(d: ProxyDir, num_shards: int) -> None:
    expected = {shard_name(k) for k in range(num_shards)}
    stray = [n for n in shard_names(d) if n not in expected]
    if stray:
        raise ProxyCorrupt(f"proxy shard {d.show(stray[0])} is not in the manifest of "
                           f"{d.show()}; remove it, or {REGENERATE}.")


def read_table(proxy_dir: Where, columns: list[str] | None = None,
               num_shards: int | None = None) -> pa.Table:
    """All shards as one table, sorted by sample id. With `num_shards` (the manifest's), every
    shard 0..num_shards-1 must be there and nothing else."""
    d = open_dir(proxy_dir)
    if num_shards is None:
        names = shard_names(d)
    else:
        _stray(d, num_shards)
        names = [shard_name(k) for k in range(num_shards)]
    if not names:
        raise ProxyMissing(f"no part-*.parquet files in {d.show()}; {REGENERATE}.")
    tables = [_read_shard(d, name, columns) for name in names]
    return pa.concat_tables(tables).sort_by("sample_id")


def check_files(proxy_dir: Where) -> dict:
    """A cheap check of a complete proxy set before a run relies on it; returns the manifest.

    The manifest must be readable, and every shard it lists there (and no other), with a
    readable Parquet footer (a truncated or overwritten file has none), the proxy schema and
    the planned number of rows. Reads no images (on object storage: one footer read per
    shard): seconds of work are saved for the full checks of `load_proxy_set`, which names
    the file at fault too.
    """
    d = open_dir(proxy_dir)
    manifest = read_manifest(d)
    size, total = int(manifest["shard_size"]), int(manifest["num_samples"])
    _stray(d, int(manifest["num_shards"]))
    for k in range(int(manifest["num_shards"])):
        name = shard_name(k)
        if not storage.exists(d.fs, d.file(name)):
            raise ShardMissing(f"proxy shard {d.show(name)} is missing; {REGENERATE}.")
        try:
            with _open_parquet(d, name) as pf:
                rows, schema = pf.metadata.num_rows, pf.schema_arrow
        except (OSError, pa.ArrowException) as exc:
            raise ProxyCorrupt(f"proxy shard {d.show(name)} is unreadable (truncated or not "
                               f"Parquet: {exc}); {REGENERATE}.") from None
        if not schema.equals(SCHEMA):
            raise ProxyCorrupt(f"proxy shard {d.show(name)} has columns {schema.names}, not "
                               f"the proxy schema {SCHEMA.names}; {REGENERATE}.")
        want = min(size, total - k * size)
        if rows != want:
            raise ProxyCorrupt(f"proxy shard {d.show(name)} holds {rows} rows, the manifest "
                               f"expects {want}; {REGENERATE}.")
    return manifest


def _check_rows(d: ProxyDir, manifest: dict) -> None:
    """Row counts per shard and distinct ids, against the manifest; names the bad shard."""
    size, total = int(manifest["shard_size"]), int(manifest["num_samples"])
    seen: dict[str, str] = {}
    for k in range(int(manifest["num_shards"])):
        name = shard_name(k)
        ids = _read_shard(d, name, ["sample_id"]).column(0).to_pylist()
        expected = min(size, total - k * size)
        if len(ids) != expected:
            raise ProxyCorrupt(f"proxy shard {d.show(name)} holds {len(ids)} rows, the "
                               f"manifest expects {expected}; {REGENERATE}.")
        for i in ids:
            if i in seen:
                raise ProxyCorrupt(f"proxy shard {d.show(name)} repeats sample {i} of "
                                   f"{seen[i]} (a shard copied over another?); "
                                   f"{REGENERATE}.")
            seen[i] = d.show(name)


def load_proxy_set(proxy_dir: Where) -> ProxySet:
    """Load a complete proxy set (its manifest must exist) with images decoded."""
    from aspkd_ray.datasets import png_decode

    d = open_dir(proxy_dir)
    manifest = read_manifest(d)
    t = read_table(d, num_shards=int(manifest["num_shards"]))
    ids = np.asarray(t.column("sample_id").to_pylist(), dtype=object)
    if len(ids) != manifest["num_samples"] or len(set(ids.tolist())) != len(ids):
        _check_rows(d, manifest)  # names the shard at fault
        raise ProxyCorrupt(f"{d.show()}: {len(ids)} rows ({len(set(ids.tolist()))} distinct) "
                           f"but the manifest lists {manifest['num_samples']} samples; "
                           f"{REGENERATE}.")
    pngs = t.column("png").to_pylist()
    try:
        images = (np.stack([png_decode(b) for b in pngs]) if pngs
                  else np.zeros((0, 1, 1, 1), np.uint8))
    except (OSError, ValueError) as exc:  # PIL: not a PNG, or images of different sizes
        raise ProxyCorrupt(f"{d.show()}: a proxy image cannot be decoded ({exc}); "
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
