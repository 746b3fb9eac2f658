"""The sample plan: which image each proxy sample is (Algorithm 1, steps 4-6).

Sample i gets a class (uniform, or exact balance), a template (uniform), and a seed, all
derived from (seed, i) by hashing, so sample i is the same whatever m is and however the
work is split. Its id hashes (generator id, class, template, seed): the same config gives the
same ids, and a different generator never reuses one. The validation split is exact: a fixed
fraction of every class, picked by a hash key.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aspkd_ray.config import Config, config_hash

SPLITS = ("train", "val")


def _digest(*parts: object) -> bytes:
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()


def sample_seed(seed: int, index: int) -> int:
    """The generation seed of sample `index`: 63 bits, so it fits int64 and torch."""
    return int.from_bytes(_digest("aspkd-sample", seed, index)[:8], "big") >> 1


def sample_id(generator: str, class_id: int, template: str, seed: int) -> str:
    """A sample's id: a short sha256 of (generator id, class, template, seed)."""
    return _digest(generator, class_id, template, seed).hex()[:20]


def class_names_for(cfg: Config) -> tuple[str, ...]:
    """The class names the prompts use: the data set's, read from its files where the spec
    has none (Food-101's meta/classes.txt, an image folder's sub-folders)."""
    from aspkd_ray.datasets import get_spec

    spec = get_spec(cfg.dataset.name)
    root = Path(cfg.dataset.root or f"data/{cfg.dataset.name}")
    if cfg.dataset.name == "food101":
        for path in (root / "food-101" / "meta" / "classes.txt", root / "meta" / "classes.txt"):
            if path.is_file():
                return tuple(line.strip() for line in path.read_text().splitlines()
                             if line.strip())
    if cfg.dataset.name == "imagefolder":
        folder = root / "train"
        if folder.is_dir():
            return tuple(sorted(p.name for p in folder.iterdir() if p.is_dir()))
    if not spec.class_names:
        raise ValueError(f"dataset.name={cfg.dataset.name!r}: no class names found under "
                         f"dataset.root={cfg.dataset.root!r} (expected one sub-folder per "
                         f"class in <root>/train).")
    return spec.class_names


def prompt_for(template: str, class_name: str) -> str:
    return template.replace("{class}", class_name.replace("_", " "))


def generator_id(cfg: Config) -> str:
    """Names the generator and its sampling settings: ids change when images would."""
    from aspkd_ray.generation.registry import get_generator

    g = cfg.generator
    model = get_generator(g.kind).identity(cfg)  # what model: the kind decides
    sampling = {"scheduler": g.scheduler, "steps": g.steps, "guidance": g.guidance_scale,
                "resolution": g.resolution, "dtype": g.dtype}
    return f"{g.kind}:{model}:{config_hash(sampling)[:8]}"


@dataclass
class SamplePlan:
    """Every planned sample, in index order, with the shard layout."""

    index: np.ndarray          # int64, 0..m-1
    sample_id: np.ndarray      # str
    class_id: np.ndarray       # int64
    class_name: np.ndarray     # str
    template: np.ndarray       # str
    prompt: np.ndarray         # str
    seed: np.ndarray           # int64
    split: np.ndarray          # str
    generator: str
    class_names: tuple[str, ...]
    shard_size: int

    def __len__(self) -> int:
        return len(self.index)

    @property
    def num_shards(self) -> int:
        return -(-len(self) // self.shard_size)

    def shard_slice(self, k: int) -> slice:
        return slice(k * self.shard_size, min((k + 1) * self.shard_size, len(self)))

    def rows(self, sl: slice) -> dict[str, np.ndarray]:
        """Columns for rows `sl`, as Ray Data / the generator actors take them."""
        return {"index": self.index[sl], "sample_id": self.sample_id[sl],
                "class_id": self.class_id[sl], "class_name": self.class_name[sl],
                "prompt": self.prompt[sl], "seed": self.seed[sl], "split": self.split[sl]}


def num_samples(cfg: Config, num_classes: int) -> int:
    """m: proxy.total, else proxy.per_class x classes."""
    if cfg.proxy.total is not None:
        return cfg.proxy.total
    return cfg.proxy.per_class * num_classes


MIN_SHARDS = 8  # a shard is one actor's unit of work: enough of them to keep a pool busy


def default_shard_size(batch_size: int, num_samples: int | None = None) -> int:
    # A whole number of generator batches (so a resumed shard is batched exactly as a fresh
    # one), about 512 images: small enough to lose little on interruption; fewer batches
    # when that would leave a small set fewer than MIN_SHARDS shards to share out.
    batches = max(1, round(512 / batch_size))
    if num_samples is not None:
        batches = max(1, min(batches, num_samples // (MIN_SHARDS * batch_size)))
    return batch_size * batches


def _stratified_quota(counts: np.ndarray, fraction: float) -> np.ndarray:
    """Validation images per class: round(fraction x m) in all, shared in proportion to the
    class sizes (largest remainders first, then lower class ids)."""
    exact = counts * fraction
    quota = np.floor(exact).astype(np.int64)
    extra = int(round(fraction * counts.sum())) - int(quota.sum())
    order = sorted(range(len(counts)), key=lambda k: (-(exact[k] - quota[k]), k))
    for k in order[:max(extra, 0)]:
        quota[k] += 1
    return np.minimum(quota, counts)


def make_plan(cfg: Config, class_names: tuple[str, ...] | None = None,
              shard_size: int | None = None) -> SamplePlan:
    """The deterministic plan for `cfg` (same config, same plan)."""
    names = tuple(class_names or class_names_for(cfg))
    if not names:
        raise ValueError("make_plan: no class names; expected at least one class.")
    m, c = num_samples(cfg, len(names)), len(names)
    shard_size = shard_size or default_shard_size(cfg.generator.batch_size, m)
    if shard_size < 1:
        raise ValueError(f"shard_size: got {shard_size}; expected a positive integer.")
    templates = list(cfg.generator.templates)
    gen = generator_id(cfg)
    digests = [_digest("aspkd-sample", cfg.seed, i) for i in range(m)]
    seeds = np.array([int.from_bytes(d[:8], "big") >> 1 for d in digests], dtype=np.int64)
    if cfg.proxy.balanced:  # round-robin: exact balance, and the same for every m
        classes = np.arange(m, dtype=np.int64) % c
    else:
        classes = np.array([int.from_bytes(d[8:16], "big") % c for d in digests],
                           dtype=np.int64)
    tpl_idx = np.array([int.from_bytes(d[16:24], "big") % len(templates) for d in digests])
    split_key = [d[24:32] for d in digests]
    tpl = np.array([templates[t] for t in tpl_idx], dtype=object)
    class_name = np.array([names[k] for k in classes], dtype=object)
    prompts = np.array([prompt_for(t, n) for t, n in zip(tpl, class_name, strict=True)], dtype=object)
    ids = np.array([sample_id(gen, int(k), t, int(s)) for k, t, s in zip(classes, tpl, seeds, strict=True)],
                   dtype=object)
    split = np.full(m, "train", dtype=object)
    n_val = _stratified_quota(np.bincount(classes, minlength=c), cfg.proxy.val_fraction)
    for k in range(c):
        members = sorted(np.flatnonzero(classes == k), key=lambda j: split_key[j])
        split[members[:n_val[k]]] = "val"
    return SamplePlan(index=np.arange(m, dtype=np.int64), sample_id=ids, class_id=classes,
                      class_name=class_name, template=tpl, prompt=prompts, seed=seeds,
                      split=split, generator=gen, class_names=names, shard_size=shard_size)
