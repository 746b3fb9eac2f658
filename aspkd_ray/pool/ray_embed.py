"""Ray Data pass over the pool's shards: the student's latents (or classes) of every train
image, computed in actors that read, decode and resize one shard at a time."""

from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger(__name__)


class ShardEncoder:
    """Ray Data actor: the student (weights from the object store), applied shard by shard."""

    def __init__(self, pool, arch: dict, weights, what: str, dtype: str) -> None:
        import ray

        from aspkd_ray.models import create_model

        if isinstance(weights, ray.ObjectRef):
            weights = ray.get(weights)
        a = arch
        self.model = create_model(a["name"], num_classes=a["num_classes"],
                                  in_chans=a["in_chans"], image_size=a["image_size"])
        self.model.load_state_dict(weights)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.eval().to(self.device)
        self.pool, self.what, self.dtype = pool, what, np.dtype(dtype)
        rows = np.sort(pool.train_rows)
        shard_of = pool.index.shard[rows]
        self.rows = {int(k): rows[shard_of == k] for k in np.unique(shard_of)}

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        from aspkd_ray.datasets.tensors import to_tensor

        p = self.pool
        positions, outputs = [], []
        for k in batch["shard"]:
            rows = self.rows.get(int(k), np.zeros(0, np.int64))
            images = p.index.read_images(rows)  # the shard read once, stored size
            for c in range(0, len(rows), p.embed_batch):
                part = rows[c:c + p.embed_batch]
                x = to_tensor(images[c:c + p.embed_batch], p.size, p.channels).to(self.device)
                if self.what == "latents":
                    out = self.model.embed(x).float().cpu().numpy().astype(self.dtype)
                elif self.what == "probabilities":
                    out = self.model(x).float().softmax(1).cpu().numpy()
                else:
                    out = self.model(x).argmax(1).cpu().numpy().astype(np.int64)
                positions.append(part)
                outputs.append(out)
        if not positions:
            return {"row": np.zeros(0, np.int64), "out": np.zeros((0, 1), np.float32)}
        return {"row": np.concatenate(positions), "out": np.concatenate(outputs)}


def num_actors(requested: int | None, gpus_each: float) -> int:
    """pool.embed_actors, or one actor per GPU (gpus_each > 0), else one per alive node."""
    import ray

    if requested:
        return requested
    if gpus_each > 0:
        return max(1, int(ray.cluster_resources().get("GPU", 0) // gpus_each))
    return max(1, sum(1 for n in ray.nodes() if n.get("Alive") and
                      n.get("Resources", {}).get("CPU", 0) > 0))


def map_pool(pool, arch: dict, weights: dict, what: str) -> np.ndarray:
    """`what` ('latents', 'probabilities' or 'classes') for every train image of `pool` (a StreamedPool), in
    train-id order, by the model zoo model `arch` (its `.arch`) with `weights`."""
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    ray.data.DataContext.get_current().enable_progress_bars = False
    shards = np.unique(pool.index.shard[pool.train_rows])
    ds = ray.data.from_items([{"shard": int(k)} for k in shards])
    actors = min(num_actors(pool.embed_actors, pool.embed_gpus), len(shards))
    free = ray.available_resources().get("CPU", 0.0)
    cpus = max(0.05, min(1.0, free / actors)) if pool.embed_gpus == 0 else 1.0
    dtype = {"latents": pool.latents_dtype, "probabilities": "float32"}.get(what, "int64")
    out = ds.map_batches(
        ShardEncoder, batch_size=1, fn_constructor_kwargs={
            "pool": pool, "arch": arch, "weights": ray.put(weights), "what": what, "dtype": dtype},
        compute=ActorPoolStrategy(size=actors),
        num_cpus=cpus, num_gpus=pool.embed_gpus or None)
    # Positions in the train split: train_rows is sorted, so searchsorted maps pool rows.
    result: np.ndarray | None = None
    seen = 0
    for b in out.iter_batches(batch_size=None, batch_format="numpy"):
        rows, values = b["row"], b["out"]
        if len(rows) == 0:
            continue
        if result is None:
            result = np.empty((len(pool.train_rows), *values.shape[1:]), values.dtype)
        result[np.searchsorted(pool.train_rows, rows)] = values
        seen += len(rows)
    if seen != len(pool.train_rows):
        raise RuntimeError(f"the pool pass returned {seen} of {len(pool.train_rows)} images")
    if what == "latents":
        log.info("pool latents: %d x %d %s, %.1f MB", *result.shape, result.dtype,
                 result.nbytes / 2**20)
    return result
