"""The proxy pool streamed from storage (pool.mode=stream): no process holds it decoded.

What the round loop needs from the whole pool is computed by streaming it:
- latents S̄(x) (and predicted classes) of every train image: Ray Data `map_batches` over the
  pool's Parquet shards, the student's encoder in actors (a GPU each with pool.embed_gpus),
  each actor reading, decoding and resizing one shard at a time; the round loop gets an
  N x D array (float16 with pool.latents=float16);
- a fit on a subset (bought + pseudo-labelled ids): decoded once in the worker when it fits
  in pool.memory_mb (exactly the in-memory path's batches), else streamed every epoch in
  chunks of at most pool.memory_mb: shards in a random order, rows shuffled within a chunk;
- validation: decoded once when it fits, else scored chunk by chunk.
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
    accuracy,
    fit,
    fit_batches,
    predict_logits,
    rank_batches,
)
from aspkd_ray.config import TrainingConfig
from aspkd_ray.pool.index import PoolIndex, float_bytes

log = logging.getLogger(__name__)


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
    embed_actors: int = 1
    embed_gpus: float = 0.0
    embed_batch: int = 256
    _val: torch.Tensor | None = field(default=None, repr=False)

    @property
    def classes(self) -> np.ndarray:
        return self.index.classes[self.train_rows]

    @property
    def classes_val(self) -> np.ndarray:
        return self.index.classes[self.val_rows]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_val": None}  # decoded images never travel

    def keep_val(self, keep: np.ndarray) -> None:
        """Keep only these validation images (the ones whose labels were bought)."""
        self.val_rows, self._val = self.val_rows[keep], None

    def images(self, idx: np.ndarray) -> np.ndarray:
        """uint8 images of train ids `idx` as stored (what the teacher is sent)."""
        return self.index.read_images(self.train_rows[idx])

    # -- whole-pool passes: Ray Data --------------------------------------------------------

    def embed(self, model: nn.Module) -> np.ndarray:
        return self._map_pool(model, "latents")

    def predict(self, model: nn.Module) -> np.ndarray:
        return self._map_pool(model, "classes")

    def _map_pool(self, model: nn.Module, what: str) -> np.ndarray:
        from aspkd_ray.pool.ray_embed import map_pool

        net = getattr(model, "module", model)
        weights = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        return map_pool(self, net.arch, weights, what)

    # -- fits -------------------------------------------------------------------------------

    def fit(self, model: nn.Module, idx: np.ndarray | None, targets: torch.Tensor,
            training: TrainingConfig, *, rank: int = 0, world_size: int = 1,
            seed: int = 0, **kwargs) -> FitResult:
        rows = self.train_rows if idx is None else self.train_rows[np.asarray(idx)]
        if float_bytes(len(rows), self.size, self.channels) <= self.memory_bytes:
            # Decoded once for this fit: the same batches as the in-memory path.
            x = self.index.read_floats(rows, self.size, self.channels, self.memory_bytes)
            return fit(model, x, targets, training, rank=rank, world_size=world_size,
                       seed=seed, **kwargs)
        log.info("streaming a fit on %d images (over pool.memory_mb)", len(rows))
        batches = self._streamed_batches(rows, targets, training.batch_size, seed, rank,
                                         world_size)
        return fit_batches(model, batches, training, seed=seed, **kwargs)

    def _chunk_rows(self, multiple: int) -> int:
        """Images per chunk: as many as pool.memory_mb holds, a multiple of `multiple`."""
        fit_in = self.memory_bytes // float_bytes(1, self.size, self.channels)
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
                x = self.index.read_floats(rows[need], self.size, self.channels,
                                           self.memory_bytes)
                where = {int(p): i for i, p in enumerate(need)}
                for b in mine:
                    at = torch.as_tensor([where[int(p)] for p in b])
                    yield x[at], targets[b]
                del x

        return epoch_batches

    # -- validation -------------------------------------------------------------------------

    def validator(self, val_labels: np.ndarray | None) -> Callable[[nn.Module], float]:
        y = torch.as_tensor(self.classes_val if val_labels is None else val_labels)
        if float_bytes(len(self.val_rows), self.size, self.channels) <= self.memory_bytes:
            def score(model: nn.Module) -> float:
                if self._val is None:
                    self._val = self.index.read_floats(self.val_rows, self.size,
                                                       self.channels, self.memory_bytes)
                return accuracy(model, self._val, y)
            return score

        def streamed(model: nn.Module) -> float:
            if len(self.val_rows) == 0:
                return float("nan")
            step, right = self._chunk_rows(1), 0
            for c in range(0, len(self.val_rows), step):
                x = self.index.read_floats(self.val_rows[c:c + step], self.size,
                                           self.channels, self.memory_bytes)
                right += int((predict_logits(model, x).argmax(1) == y[c:c + step]).sum())
            return 100.0 * right / len(self.val_rows)
        return streamed
