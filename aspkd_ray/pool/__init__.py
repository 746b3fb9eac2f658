"""The proxy pool as the attack sees it: in memory, or streamed from its Parquet shards.

`open_pool(cfg, proxy)` picks the path (`pool.mode`; auto = memory when the decoded pool fits
in `pool.memory_mb`) and returns an `OpenPool`: the round loop's `Pool` (train split; the
validation split for early stopping), the set's ids, classes and splits, and `read(rows)`
for the few images the driver itself needs (bought validation labels, evaluation).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from aspkd_ray.pool.index import PoolIndex, PoolTooLarge, float_bytes
from aspkd_ray.pool.streamed import StreamedPool

log = logging.getLogger(__name__)

__all__ = ["OpenPool", "PoolIndex", "PoolTooLarge", "StreamedPool", "float_bytes",
           "open_pool"]


@dataclass
class OpenPool:
    mode: str                    # "memory" | "stream"
    pool: object                 # ProxyPool (memory) or StreamedPool (stream)
    index: PoolIndex             # every image of the set: ids, classes, splits (positions)
    memory_bytes: int
    images: np.ndarray | None = None  # memory: every image, decoded; stream: None

    @property
    def ids(self) -> np.ndarray:
        return self.index.ids

    @property
    def classes(self) -> np.ndarray:
        return self.index.classes

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.index.class_names

    @cached_property
    def train(self) -> np.ndarray:
        """Positions of the train split (the attack's ids 0..N-1)."""
        return self.index.positions("train")

    @cached_property
    def val(self) -> np.ndarray:
        return self.index.positions("val")

    def read(self, rows: np.ndarray) -> np.ndarray:
        """uint8 images of these positions: from memory, else decoded from the shards."""
        return self.images[rows] if self.images is not None else self.index.read_images(rows)

    def read_chunked(self, rows: np.ndarray, fn: Callable[[np.ndarray], np.ndarray],
                     size: int, channels: int) -> np.ndarray:
        """fn(images) over `rows`, a chunk of at most pool.memory_mb at a time."""
        step = max(1, self.memory_bytes // float_bytes(1, size, channels))
        parts = [fn(self.read(rows[c:c + step])) for c in range(0, len(rows), step)]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def choose_mode(mode: str, num_images: int, size: int, channels: int,
                memory_mb: int) -> str:
    """`pool.mode`, with auto resolved: memory when the decoded pool fits in memory_mb."""
    if mode != "auto":
        return mode
    return "memory" if float_bytes(num_images, size, channels) <= memory_mb * 2**20 \
        else "stream"


def open_pool(cfg, proxy: str, size: int, channels: int) -> OpenPool:
    """The proxy set at `proxy` as the attack's pool, at input size `size` x `channels`."""
    import torch

    from aspkd_ray.aspkd.rounds import ProxyPool
    from aspkd_ray.datasets import to_tensor
    from aspkd_ray.generation import load_proxy_set

    p = cfg.pool
    memory = p.memory_mb * 2**20
    index = PoolIndex.open(proxy)  # small columns only
    mode = choose_mode(p.mode, len(index), size, channels, p.memory_mb)
    log.info("proxy pool: %d images, %s path", len(index), mode)
    if mode == "stream":
        pool = StreamedPool(index=index, train_rows=index.positions("train"),
                            val_rows=index.positions("val"), size=size, channels=channels,
                            memory_bytes=memory, latents_dtype=p.latents,
                            embed_actors=p.embed_actors, embed_gpus=p.embed_gpus,
                            embed_batch=p.embed_batch)
        return OpenPool("stream", pool, index, memory)
    # The set's rows are sorted by sample id, as the index numbers them.
    proxy_set = load_proxy_set(proxy)
    opened = OpenPool("memory", None, index, memory, proxy_set.images)
    x_all = to_tensor(proxy_set.images, size, channels)
    tr, va = torch.as_tensor(opened.train), torch.as_tensor(opened.val)
    opened.pool = ProxyPool(x=x_all[tr], classes=index.classes[opened.train], x_val=x_all[va],
                            classes_val=index.classes[opened.val])
    return opened
