"""One benchmark scenario, prepared once in the driver and shared with every cell: the
proxy pool and a natural pool in memory, the victim's answers behind each (read only through
a cell's meter), and the experimenter's test set with the victim's classes on it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from aspkd_ray.aspkd.rounds import ProxyPool
from aspkd_ray.config import Config, config_hash, load, to_dict

NATURAL_VAL = 10  # a natural pool has no validation role; fit still wants a (tiny) split


@dataclass
class Scenario:
    name: str
    config: str                  # the YAML (or packaged name) cells load their config from
    overrides: tuple[str, ...]   # the benchmark's --set, applied to every cell
    num_classes: int
    pools: dict[str, ProxyPool]  # "proxy": the generated set; "natural": Knockoff's pool
    answers: dict[tuple[str, str], np.ndarray]  # (pool, output) -> victim answer per image
    x_test: torch.Tensor
    victim_test: np.ndarray      # the victim's class for each test image
    victim_accuracy: float       # the victim's own test accuracy (%)
    config_hash: str = ""        # of the scenario's config before pinning (rows must match)
    # What a cell's teacher sells, where it differs from the victim's answers (an audit's
    # defended teacher); `answers` stay the truth the report measures against.
    served: dict[tuple[str, str], np.ndarray] | None = None
    init_as: str = ""            # share the init step of this scenario (same pool and config)
    record_queries: bool = False  # rows list the pool rows bought, in order (for PRADA)

    def cell_config(self, overrides: list[str] | tuple[str, ...]) -> Config:
        return load(self.config, [*self.overrides, *overrides])

    def describe(self) -> dict:
        """What the report says about the scenario."""
        def majority(pool: str) -> float:
            counts = np.bincount(self.victim_classes(pool), minlength=self.num_classes)
            return round(float(counts.max() / counts.sum() * 100), 1)

        return {"config": self.config, "config_hash": self.config_hash,
                "victim_test_accuracy": round(self.victim_accuracy, 2),
                "proxy_pool": len(self.pools["proxy"].classes),
                "natural_pool": len(self.pools["natural"].classes),
                "victim_majority_class_share": {p: majority(p) for p in self.pools},
                "test_images": len(self.victim_test)}

    def victim_classes(self, pool: str) -> np.ndarray:
        """What the victim says of every image of a pool (evaluation only)."""
        return _classes(self.answers[pool, "soft"])


def _classes(answers: np.ndarray) -> np.ndarray:
    return answers.argmax(1).astype(np.int64) if answers.ndim == 2 else answers


def scenario_name(config: str) -> str:
    """`digits` for the packaged name or tune_configs/digits.yaml."""
    return Path(config).stem if config.endswith((".yaml", ".yml")) else config


def natural_pool(size: int, channels: int) -> np.ndarray:
    """Knockoff's natural pool: scikit-learn's 1,797 8x8 digits (not the victim's data; their
    labels stay unknown to the attack), upscaled into the box MNIST digits fill and centred
    in the frame, as an attacker formats images for the API (full-frame digits look like
    one class to the victim: measured 71% of them, against 28% framed). uint8 N x H x W x C."""
    from aspkd_ray.datasets.sources import frame_like_mnist, sklearn_digits

    return frame_like_mnist(sklearn_digits()[0], size, channels)


def prepare_scenario(config: str, overrides: list[str]) -> Scenario:
    """Victim and proxy set made (or reused from the cache), then read into memory. Needs Ray
    only when the proxy set must be generated."""
    from aspkd_ray.datasets import load_victim_data, to_tensor
    from aspkd_ray.evaluation.oracle import EvaluationOracle
    from aspkd_ray.jobs.demo import proxy_cache_dir
    from aspkd_ray.jobs.steal import ensure_proxy, ensure_victim
    from aspkd_ray.layout import input_shape, victim_checkpoint_dir
    from aspkd_ray.pool import open_pool

    base = load(config, overrides)
    settings_hash = config_hash(to_dict(base))[:12]
    ensure_victim(base)
    # Pin the victim and the proxy set: every cell (any seed or method) uses these two.
    pinned = (f"proxy.dir={proxy_cache_dir(base)}",
              f"victim.checkpoint={Path(victim_checkpoint_dir(base)).resolve()}")
    base = load(config, [*overrides, *pinned])
    size, chans = input_shape(base)
    opened = open_pool(dataclasses.replace(base, pool=dataclasses.replace(
        base.pool, mode="memory")), ensure_proxy(base), size, chans)
    num_classes = len(opened.class_names)
    natural_images = natural_pool(size, chans)
    natural_x = to_tensor(natural_images, size, chans)
    zeros = np.zeros(len(natural_x), np.int64)
    pools = {"proxy": opened.pool,
             "natural": ProxyPool(x=natural_x, classes=zeros, x_val=natural_x[:NATURAL_VAL],
                                  classes_val=zeros[:NATURAL_VAL])}
    images = {"proxy": opened.read(opened.train), "natural": natural_images}
    answers = {}
    for output in ("soft", "hard"):
        oracle = EvaluationOracle(dataclasses.replace(
            base, victim=dataclasses.replace(base.victim, output=output)), num_classes)
        for name, imgs in images.items():
            answers[name, output] = (oracle.predict_proba(imgs) if output == "soft"
                                     else oracle.predict_classes(imgs))
    test = load_victim_data(base.dataset.name, "test", base.dataset.root,
                            base.dataset.download, size)
    victim_test = oracle.predict_classes(test.images)
    return Scenario(name=scenario_name(config), config=config,
                    overrides=(*overrides, *pinned), num_classes=num_classes, pools=pools,
                    answers=answers, x_test=to_tensor(test.images, size, chans),
                    victim_test=victim_test,
                    victim_accuracy=float((victim_test == test.labels).mean() * 100),
                    config_hash=settings_hash)
