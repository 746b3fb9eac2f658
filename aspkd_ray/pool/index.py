"""The proxy pool without its pixels: which image is where, and reading only the rows asked.

`PoolIndex.open(proxy)` reads the small columns of every Parquet shard (sample id, generation
class, split) and remembers each image's shard and row. Pixels are read on demand, a shard at
a time, for the rows asked only (`read_images`): memory follows the rows asked,
never the pool. Positions are the pool's rows sorted by sample id, as `load_proxy_set` orders
them, so both paths number the pool alike. No Ray here.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from aspkd_ray.datasets.tensors import png_decode


class PoolTooLarge(RuntimeError):
    """A read would decode more than a process may hold at once (pool.memory_mb): a bug in a
    caller that should have streamed."""


def float_bytes(n: int, size: int, channels: int) -> int:
    """Bytes of n images as float32 at the model's input size."""
    return int(n) * size * size * channels * 4


class RowCache:
    """Decoded images (uint8, as stored) by pool position, least recently used dropped first
    beyond `limit_bytes`: a pool that fits is decoded once per process, a larger one streams
    through it with bounded memory."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit, self.used = limit_bytes, 0
        self.rows: OrderedDict[int, np.ndarray] = OrderedDict()

    def get(self, row: int) -> np.ndarray | None:
        image = self.rows.get(row)
        if image is not None:
            self.rows.move_to_end(row)
        return image

    def put(self, row: int, image: np.ndarray) -> None:
        if image.nbytes > self.limit or row in self.rows:
            return
        self.rows[row] = image
        self.used += image.nbytes
        while self.used > self.limit:
            _, old = self.rows.popitem(last=False)
            self.used -= old.nbytes


@dataclass
class PoolIndex:
    location: str            # the proxy folder or URI
    shard_names: list[str]   # file names, indexed by `shard`
    ids: np.ndarray          # sample ids, sorted
    classes: np.ndarray      # generation class of each row
    split: np.ndarray        # 'train' | 'val'
    shard: np.ndarray        # which shard holds each row
    row: np.ndarray          # its row in that shard
    class_names: tuple[str, ...] = ()
    image_size: int = 0      # as stored (the victim's input size)
    channels: int = 0
    cache: RowCache | None = field(default=None, repr=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "cache": None}  # decoded images stay in their process

    def use_cache(self, limit_bytes: int) -> None:
        """Keep up to `limit_bytes` of decoded images in this process (see RowCache)."""
        if self.cache is None or self.cache.limit != limit_bytes:
            self.cache = RowCache(limit_bytes)

    def stored_bytes(self, n: int) -> int:
        """Bytes of n decoded images as stored (uint8)."""
        return int(n) * self.image_size * self.image_size * max(self.channels, 1)

    @classmethod
    def open(cls, location: str) -> PoolIndex:
        """Index a complete proxy set (manifest first: an incomplete set is refused)."""
        from aspkd_ray.generation import store

        d = store.open_dir(location)
        manifest = store.read_manifest(d)
        names = [store.shard_name(k) for k in range(int(manifest["num_shards"]))]
        parts = []
        for k, name in enumerate(names):
            t = store.read_shard(d.at(name), columns=["sample_id", "class_id", "split"])
            n = t.num_rows
            parts.append((np.asarray(t.column("sample_id").to_pylist(), dtype=object),
                          t.column("class_id").to_numpy().astype(np.int64),
                          np.asarray(t.column("split").to_pylist(), dtype=object),
                          np.full(n, k, np.int32), np.arange(n, dtype=np.int32)))
        ids, classes, split, shard, row = (np.concatenate([p[i] for p in parts])
                                           for i in range(5))
        if len(ids) != manifest["num_samples"] or len(set(ids.tolist())) != len(ids):
            raise store.ProxyCorrupt(f"{d.show()}: {len(ids)} rows but the manifest lists "
                                     f"{manifest['num_samples']} samples; {store.REGENERATE}.")
        order = np.argsort(ids.astype(str), kind="stable")
        return cls(location, names, ids[order].astype(str), classes[order],
                   split[order].astype(str), shard[order], row[order],
                   tuple(manifest.get("class_names", ())), int(manifest.get("image_size", 0)),
                   int(manifest.get("channels", 0)))

    def __len__(self) -> int:
        return len(self.ids)

    def positions(self, split: str) -> np.ndarray:
        """Rows of one split ('train' or 'val'), in pool order."""
        return np.flatnonzero(self.split == split)

    def read_images(self, rows: np.ndarray) -> np.ndarray:
        """uint8 N x H x W x C of `rows` (pool positions), in the order asked. Each shard
        involved is read once (its image column only), then only the rows asked are
        decoded."""
        from aspkd_ray.generation import store

        rows = np.asarray(rows, dtype=np.int64)
        out: list[np.ndarray | None] = [None] * len(rows)
        if self.cache is not None:
            for i, r in enumerate(rows):
                out[i] = self.cache.get(int(r))
        todo = np.asarray([i for i, img in enumerate(out) if img is None], dtype=np.int64)
        for k in np.unique(self.shard[rows[todo]]):
            at = todo[self.shard[rows[todo]] == k]
            column = store.read_shard(store.open_dir(self.location).at(self.shard_names[k]),
                                      columns=["png"]).column("png")
            for i in at:
                out[i] = png_decode(column[int(self.row[rows[i]])].as_py())
                if self.cache is not None:
                    self.cache.put(int(rows[i]), out[i])
        if not out:
            return np.zeros((0, 1, 1, 1), np.uint8)
        return np.stack(out)
