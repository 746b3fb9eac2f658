"""The proxy pool streamed from storage (pool.mode=stream): no process holds it decoded
unless it fits in pool.memory_mb.

Every process decodes only the rows it works on, and keeps decoded images (uint8, as stored)
for reuse in half of pool.memory_mb, least recently used dropped first: a pool that fits is
decoded once per process; a larger one streams through with bounded memory.
- Latents S̄(x) (and predicted classes) of every train image: in the Ray Train worker, a
  chunk at a time, or by Ray Data `map_batches` over the pool's shards with the student's
  encoder in actors (pool.embed_actors; a GPU each with pool.embed_gpus), each actor reading,
  decoding and resizing one shard at a time. The round loop gets an N x D array (float16
  with pool.latents=float16).
- A fit on a subset (bought + pseudo-labelled ids): when the subset's images fit in half of
  pool.memory_mb they are read once and converted batch by batch, exactly the in-memory
  path's batches; otherwise each epoch streams them in chunks of at most that size: shards
  in a random order, rows shuffled within a chunk.
- Validation: read once when it fits, else scored chunk by chunk.
kNN pseudo-labels search the pool's latents against the bought references only (at most the
budget), in query batches (aspkd/pseudo_labels.py), so their index never holds the pool.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from aspkd_ray.aspkd.distill import (
    FitResult,
    embed,
    fit,
    fit_batches,
    predict_logits,
    rank_batches,
)
from aspkd_ray.config import TrainingConfig
from aspkd_ray.datasets.tensors import to_tensor
from aspkd_ray.pool.index import PoolIndex, PoolTooLarge, float_bytes

log = logging.getLogger(__name__)


class StoredImages:
    """uint8 images held as stored, turned into float model inputs a batch at a time (the
    same values `to_tensor` gives the whole set at once)."""

    def __init__(self, images: np.ndarray, size: int, channels: int) -> None:
        self.images, self.size, self.channels = images, size, channels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx) -> torch.Tensor:
        idx = idx.numpy() if isinstance(idx, torch.Tensor) else idx
        return to_tensor(self.images[idx], self.size, self.channels)


@dataclass
class StreamedPool:
    """The pool's train split (ids 0..N-1 are `train_rows`) and validation split, read on
    demand from the proxy set's shards. Small to pickle: it travels to every worker."""

    index: PoolIndex
    train_rows: np.ndarray       # pool positions of the train split, in id order
    val_rows: np.ndarray         # pool positions of the validation split used
    size: int                    # model input size
    channels: int
    memory_bytes: int            # pool.memory_mb
    latents_dtype: str = "float32"
    embed_actors: int | None = None
    embed_gpus: float = 0.0
    embed_batch: int = 256
    _val: StoredImages | None = field(default=None, repr=False)

    @property
    def classes(self) -> np.ndarray:
        return self.index.classes[self.train_rows]

    @property
    def classes_val(self) -> np.ndarray:
        return self.index.classes[self.val_rows]

    @property
    def half(self) -> int:
        """Bytes for decoded images kept for reuse, and again for those worked on."""
        return self.memory_bytes // 2

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_val": None}  # decoded images never travel

    def _read(self, rows: np.ndarray) -> np.ndarray:
        """Decoded images of `rows`; refuses more than half of pool.memory_mb at once."""
        need = self.index.stored_bytes(len(rows))
        if need > self.half:
            raise PoolTooLarge(f"{len(rows)} images are {need / 2**20:.1f} MB decoded, over "
                               f"half of pool.memory_mb={self.memory_bytes / 2**20:g}; they "
                               f"must be streamed in chunks.")
        self.index.use_cache(self.half)
        return self.index.read_images(rows)

    def keep_val(self, keep: np.ndarray) -> None:
        """Keep only these validation images (the ones whose labels were bought)."""
        self.val_rows, self._val = self.val_rows[keep], None

    # -- whole-pool passes ------------------------------------------------------------------

    def embed(self, model: nn.Module) -> np.ndarray:
        return self._map_pool(model, "latents")

    def predict(self, model: nn.Module) -> np.ndarray:
        return self._map_pool(model, "classes")

    def predict_proba(self, model: nn.Module) -> np.ndarray:
        return self._map_pool(model, "probabilities")

    def embed_here(self) -> bool:
        """Whether latents are computed in this process (see pool.embed_actors)."""
        if self.embed_actors is not None:
            return self.embed_actors == 0
        return self.index.stored_bytes(len(self.train_rows)) <= self.half

    def _map_pool(self, model: nn.Module, what: str) -> np.ndarray:
        net = getattr(model, "module", model)
        if self.embed_here():
            return self._map_here(net, what)
        from aspkd_ray.pool.ray_embed import map_pool

        weights = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        return map_pool(self, net.arch, weights, what)

    def _map_here(self, net: nn.Module, what: str) -> np.ndarray:
        """A chunk at a time, in shard order (each shard read once per pass)."""
        order = np.argsort(self.index.shard[self.train_rows], kind="stable")
        step = max(1, min(4096, self.half // float_bytes(1, self.size, self.channels)))
        out: np.ndarray | None = None
        for c in range(0, len(order), step):
            at = order[c:c + step]
            x = to_tensor(self._read(self.train_rows[at]), self.size, self.channels)
            if what == "latents":
                part = embed(net, x).numpy().astype(self.latents_dtype, copy=False)
            elif what == "probabilities":
                part = predict_logits(net, x).softmax(1).numpy()
            else:
                part = predict_logits(net, x).argmax(1).numpy()
            if out is None:
                out = np.empty((len(order), *part.shape[1:]), part.dtype)
            out[at] = part
        return out if out is not None else np.zeros((0, 1), np.float32)

    # -- fits -------------------------------------------------------------------------------

    def fit(self, model: nn.Module, idx: np.ndarray | None, targets: torch.Tensor,
            training: TrainingConfig, *, rank: int = 0, world_size: int = 1,
            seed: int = 0, **kwargs) -> FitResult:
        rows = self.train_rows if idx is None else self.train_rows[np.asarray(idx)]
        if self.index.stored_bytes(len(rows)) <= self.half:
            # Read once for this fit: the same batches as the in-memory path.
            x = StoredImages(self._read(rows), self.size, self.channels)
            return fit(model, x, targets, training, rank=rank, world_size=world_size,
                       seed=seed, **kwargs)
        log.info("streaming a fit on %d images (over half of pool.memory_mb)", len(rows))
        batches = self._streamed_batches(rows, targets, training.batch_size, seed, rank,
                                         world_size)
        return fit_batches(model, batches, training, seed=seed, **kwargs)

    def _chunk_rows(self, multiple: int) -> int:
        """Images per chunk: as many as half of pool.memory_mb holds as float32, a multiple
        of `multiple`."""
        fit_in = self.half // float_bytes(1, self.size, self.channels)
        return max(multiple, fit_in // multiple * multiple)

    def _streamed_batches(self, rows: np.ndarray, targets: torch.Tensor, batch_size: int,
                          seed: int, rank: int, world_size: int):
        shard_of = self.index.shard[rows]

        def epoch_batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            rng = np.random.default_rng([seed, epoch])  # the same on every rank
            order = np.concatenate([rng.permutation(np.flatnonzero(shard_of == k))
                                    for k in rng.permutation(np.unique(shard_of))])
            chunk = self._chunk_rows(batch_size * world_size)
            for c in range(0, len(order), chunk):
                part = torch.as_tensor(rng.permutation(order[c:c + chunk]))
                mine = list(rank_batches(part, batch_size, rank, world_size))
                need = np.unique(torch.cat(mine).numpy())
                x = to_tensor(self._read(rows[need]), self.size, self.channels)
                where = {int(p): i for i, p in enumerate(need)}
                for b in mine:
                    at = torch.as_tensor([where[int(p)] for p in b])
                    yield x[at], targets[b]
                del x

        return epoch_batches

    # -- validation -------------------------------------------------------------------------

    def validator(self, val_labels: np.ndarray | None) -> Callable[[nn.Module], float]:
        y = torch.as_tensor(self.classes_val if val_labels is None else val_labels)

        def score(model: nn.Module) -> float:
            if len(self.val_rows) == 0:
                return float("nan")
            if self.index.stored_bytes(len(self.val_rows)) <= self.half:
                if self._val is None:
                    self._val = StoredImages(self._read(self.val_rows), self.size,
                                             self.channels)
                chunks = [(0, self._val)]
            else:
                step = self._chunk_rows(1)
                chunks = ((c, StoredImages(self._read(self.val_rows[c:c + step]), self.size,
                                           self.channels))
                          for c in range(0, len(self.val_rows), step))
            right = 0
            for c, images in chunks:
                for b in range(0, len(images), 512):
                    pred = predict_logits(model, images[np.arange(b, min(b + 512,
                                                                       len(images)))])
                    right += int((pred.argmax(1) == y[c + b:c + b + len(pred)]).sum())
            # as distill.accuracy computes it (float32), so both paths score alike
            return float(torch.tensor(float(right)) / len(self.val_rows) * 100)
        return score
