"""The black box behind the service: a local checkpoint, or an HTTP endpoint.

A victim takes float tensors N x C x H x W in [0, 1] at its input size and returns its raw
answer (soft: N x C probabilities, hard: N class ids). Answers are checked by the caller
(`checks.check_answer`), never here, so every path is validated the same way.

Where a local victim runs (victim.device: cpu | cuda | auto) is decided in two steps. In the
driver, `gpu_request` says from the Ray cluster's resources whether the victim's process asks
Ray for a GPU (an actor gets one only by asking); in that process, `torch_device` puts the
victim on cuda only when a GPU was asked for and torch sees one. Ray 2.60 hides no GPU from an
actor that asked for none, so torch alone cannot tell whether a GPU is this process's to use.
HTTP victims ignore victim.device.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from aspkd_ray.config import Config, ConfigError

log = logging.getLogger(__name__)

DEVICES = ("cpu", "cuda", "auto")
VICTIM_GPUS = 1  # a local victim on cuda asks Ray for one whole GPU


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
    from aspkd_ray.layout import victim_location
    from aspkd_ray.teacher.http_victim import safe_url

    if cfg.victim.endpoint:
        return f"{cfg.victim.protocol}:{safe_url(cfg.victim.endpoint)}"
    return _local_name(victim_location(cfg))


def _local_name(location: str) -> str:
    """local:<absolute folder>, or local:<URI> for a checkpoint on object storage."""
    from aspkd_ray import storage

    return f"local:{location if storage.is_uri(location) else Path(location).resolve()}"


def gpu_request(device: str, cluster: Mapping[str, float], *, train_gpus: float = 0.0,
                autoscale: bool = False) -> int:
    """GPUs (0 or VICTIM_GPUS) the process running a local victim asks Ray for; decided in
    the driver from the cluster's resources (`ray.cluster_resources()`).

    cpu: none. auto: one when the cluster has a GPU beyond the `train_gpus` that Ray Train
    will hold at the same time (else the victim stays on CPU). cuda: one, or a ConfigError
    when the cluster has no GPU, or none left beside Ray Train's: a service holding the GPU
    a Train worker waits for would stall the attack. With `autoscale`, cuda waits for a GPU
    node instead of failing.
    """
    if device not in DEVICES:
        raise ConfigError(f"victim.device: got {device!r}; expected one of: "
                          f"{', '.join(DEVICES)}.")
    if device == "cpu":
        return 0
    total = float(cluster.get("GPU", 0.0) or 0.0)
    spare = total - float(train_gpus)
    if device == "auto":
        return VICTIM_GPUS if spare >= VICTIM_GPUS else 0
    if autoscale:
        return VICTIM_GPUS
    if total < VICTIM_GPUS:
        raise ConfigError("victim.device=cuda, but the Ray cluster has no GPU; set "
                          "victim.device=cpu or auto, or connect to a cluster with a GPU "
                          "(ray.address).")
    if spare < VICTIM_GPUS:
        fewer = (f"ray.num_workers={int(total) - VICTIM_GPUS} (a GPU left for the victim), "
                 if total - VICTIM_GPUS >= 1 else "")
        raise ConfigError(f"victim.device=cuda, but Ray Train takes {train_gpus:g} of the "
                          f"cluster's {total:g} GPU(s) and the teacher service needs one of "
                          f"its own; set {fewer}ray.use_gpu=false, or victim.device=auto "
                          f"(the victim then runs on CPU).")
    return VICTIM_GPUS


def torch_device(gpu: bool, requested: str = "auto") -> str:
    """In the victim's process: 'cuda' when a GPU was asked for (`gpu`) and torch sees one,
    else 'cpu' (with a warning when victim.device=cuda was asked for)."""
    if not gpu:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    say = log.warning if requested == "cuda" else log.info
    say("victim.device=%s: a GPU was asked for, but torch sees none in this process "
        "(CUDA_VISIBLE_DEVICES=%r, torch built for CUDA %s); the victim runs on CPU",
        requested, os.environ.get("CUDA_VISIBLE_DEVICES"), torch.version.cuda)
    return "cpu"


def cluster_resources() -> dict[str, float]:
    """The connected Ray cluster's total resources; without Ray, this machine's GPUs."""
    ray = sys.modules.get("ray")  # never imported: certainly not connected
    if ray is not None and ray.is_initialized():
        return dict(ray.cluster_resources())
    return {"GPU": float(torch.cuda.device_count())}


def local_victim_device(cfg: Config) -> str:
    """Where a victim run in this process, without a Ray request of its own (the evaluation
    oracle), goes: the cluster decides as for the service (cuda on a cluster without GPU is
    a ConfigError), then what this process sees. 'cpu' for an HTTP victim."""
    v = cfg.victim
    if v.endpoint:
        return "cpu"
    gpus = gpu_request(v.device, cluster_resources(), autoscale=cfg.ray.autoscale)
    return torch_device(gpus > 0, v.device)


def make_victim(cfg: Config, num_classes: int, device: str | None = None) -> Victim:
    """The configured victim: victim.endpoint if set, else the local checkpoint on `device`
    (default: `local_victim_device(cfg)`). HTTP victims ignore the device."""
    from aspkd_ray.layout import victim_location
    from aspkd_ray.teacher.http_victim import HttpVictim

    v = cfg.victim
    if v.endpoint:
        return HttpVictim(v.endpoint, protocol=v.protocol, output=v.output,
                          num_classes=num_classes, model_name=v.model_name,
                          timeout_s=v.timeout_s, max_retries=v.max_retries,
                          rate_limit_per_s=v.rate_limit_per_s, auth_env=v.auth_env)
    return LocalVictim(victim_location(cfg), v.output, num_classes,
                       device=device or local_victim_device(cfg))


def victim_input(images: np.ndarray, cfg: Config) -> torch.Tensor:
    """uint8 N x H x W x C → the float tensor the victim takes, at its input size."""
    from aspkd_ray.datasets import to_tensor
    from aspkd_ray.layout import input_shape

    size, channels = input_shape(cfg)
    return to_tensor(images, size, channels)
