"""The proxy pool without its pixels: which image is where, and reading only the rows asked.

`PoolIndex.open(proxy)` reads the small columns of every Parquet shard (sample id, generation
class, split) and remembers each image's shard and row. Pixels are read on demand, a shard at
a time, for the rows asked only (`read_images`, `read_floats`): memory follows the rows asked,
never the pool. Positions are the pool's rows sorted by sample id, as `load_proxy_set` orders
them, so both paths number the pool alike. No Ray here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from aspkd_ray.datasets.tensors import png_decode, to_tensor


class PoolTooLarge(RuntimeError):
    """A read would decode more than the process may hold (pool.memory_mb): a bug in a caller
    that should have streamed."""


def float_bytes(n: int, size: int, channels: int) -> int:
    """Bytes of n images as float32 at the model's input size."""
    return int(n) * size * size * channels * 4


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
                   tuple(manifest.get("class_names", ())))

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
        for k in np.unique(self.shard[rows]):
            at = np.flatnonzero(self.shard[rows] == k)
            column = store.read_shard(store.open_dir(self.location).at(self.shard_names[k]),
                                      columns=["png"]).column("png")
            for i in at:
                out[i] = png_decode(column[int(self.row[rows[i]])].as_py())
        if not out:
            return np.zeros((0, 1, 1, 1), np.uint8)
        return np.stack(out)

    def read_floats(self, rows: np.ndarray, size: int, channels: int,
                    limit_bytes: int | None = None) -> torch.Tensor:
        """float N x channels x size x size in [0, 1] of `rows`; refuses (PoolTooLarge) to
        decode more than `limit_bytes` at once."""
        need = float_bytes(len(rows), size, channels)
        if limit_bytes is not None and need > limit_bytes:
            raise PoolTooLarge(f"{len(rows)} images are {need / 2**20:.0f} MB decoded, over "
                               f"pool.memory_mb={limit_bytes / 2**20:.0f}; they must be "
                               f"streamed in chunks.")
        return to_tensor(self.read_images(rows), size, channels)
