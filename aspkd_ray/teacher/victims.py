"""The black box behind the service: a local checkpoint, or an HTTP endpoint.

A victim takes float tensors N x C x H x W in [0, 1] at its input size and returns its raw
answer (soft: N x C probabilities, hard: N class ids). Answers are checked by the caller
(`checks.check_answer`), never here, so every path is validated the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from aspkd_ray.config import Config


class Victim(Protocol):
    output: str
    num_classes: int
    remote: bool  # True: a call leaves this process (so it is reserved before it is made)

    def predict(self, x: torch.Tensor) -> np.ndarray: ...


class LocalVictim:
    """A model-zoo checkpoint run in this process (the victim's weights stay in here)."""

    remote = False

    def __init__(self, checkpoint: str | Path, output: str, num_classes: int,
                 device: str = "cpu") -> None:
        from aspkd_ray import cache
        from aspkd_ray.models import load_checkpoint
        from aspkd_ray.models.checkpoint import ARCH

        if output not in ("soft", "hard"):
            raise ValueError(f"output must be 'soft' or 'hard', got {output!r}.")
        # A URI (cache_dir on object storage) is loaded from this process's local mirror.
        self.model = load_checkpoint(cache.local_copy(checkpoint, ARCH)).eval().to(device)
        have = self.model.arch["num_classes"]
        if have != num_classes:
            raise ValueError(f"victim checkpoint {checkpoint} has {have} classes, but the "
                             f"attack was set up for {num_classes}.")
        self.output, self.num_classes, self.device = output, num_classes, device
        self.name = _local_name(str(checkpoint))

    def predict(self, x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            logits = self.model(x.to(self.device)).float()
        if self.output == "hard":  # probabilities never leave this method in hard mode
            return logits.argmax(1).cpu().numpy().astype(np.int64)
        return logits.softmax(1).cpu().numpy()


def victim_name(cfg: Config) -> str:
    """A readable identity of the configured victim (no credentials)."""
    from aspkd_ray.teacher.http_victim import safe_url
    from aspkd_ray.victim.train import victim_location

    if cfg.victim.endpoint:
        return f"{cfg.victim.protocol}:{safe_url(cfg.victim.endpoint)}"
    return _local_name(victim_location(cfg))


def _local_name(location: str) -> str:
    """local:<absolute folder>, or local:<URI> for a checkpoint on object storage."""
    from aspkd_ray import storage

    return f"local:{location if storage.is_uri(location) else Path(location).resolve()}"


def make_victim(cfg: Config, num_classes: int) -> Victim:
    """The configured victim: victim.endpoint if set, else the local checkpoint."""
    from aspkd_ray.teacher.http_victim import HttpVictim
    from aspkd_ray.victim.train import victim_location

    v = cfg.victim
    if v.endpoint:
        return HttpVictim(v.endpoint, protocol=v.protocol, output=v.output,
                          num_classes=num_classes, model_name=v.model_name,
                          timeout_s=v.timeout_s, max_retries=v.max_retries,
                          rate_limit_per_s=v.rate_limit_per_s, auth_env=v.auth_env)
    return LocalVictim(victim_location(cfg), v.output, num_classes)


def victim_input(images: np.ndarray, cfg: Config) -> torch.Tensor:
    """uint8 N x H x W x C → the float tensor the victim takes, at its input size."""
    from aspkd_ray.datasets import to_tensor
    from aspkd_ray.victim.train import input_shape

    size, channels = input_shape(cfg)
    return to_tensor(images, size, channels)
