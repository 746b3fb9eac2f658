"""The experimenter's evaluation oracle: the victim's labels on the real test set.

It loads the victim exactly as the teacher service does (the local checkpoint, or the HTTP
endpoint with the same protocol, timeouts, retries and credentials) and checks every answer
the same way, but it has no ledger and no budget: evaluation is not part of the attack and
costs the attack nothing. It is built by the evaluation code after (or beside) the attack
and never handed to it; the attack reaches the victim only through the teacher service.

It runs the victim in this process, placed by victim.device with the service's rule
(`victims.local_victim_device`): cuda on a cluster without a GPU fails at once, and the victim
goes to cuda only when this process's torch sees a GPU (a driver on a head without one runs
it on CPU).
"""

from __future__ import annotations

import logging

import numpy as np

from aspkd_ray.config import Config

log = logging.getLogger(__name__)


class EvaluationOracle:
    """Victim labels for the experimenter: predict_classes, and predict_proba (soft only)."""

    def __init__(self, cfg: Config, num_classes: int | None = None) -> None:
        from aspkd_ray.datasets import get_spec
        from aspkd_ray.teacher.victims import local_victim_device, make_victim

        self.cfg = cfg
        self.output = cfg.victim.output
        self.device = local_victim_device(cfg)  # first: a wrong victim.device fails at once
        self.num_classes = num_classes or self._num_classes(cfg) or get_spec(
            cfg.dataset.name).num_classes
        if not self.num_classes:
            raise ValueError(f"the number of classes of data set {cfg.dataset.name!r} is not "
                             f"known here; pass num_classes.")
        self.victim = make_victim(cfg, self.num_classes, device=self.device)
        self.batch_size = cfg.victim.batch_size
        if not cfg.victim.endpoint:
            log.info("evaluation oracle: victim on %s (victim.device=%s)", self.device,
                     cfg.victim.device)

    @staticmethod
    def _num_classes(cfg: Config) -> int | None:
        if cfg.victim.endpoint:
            return None
        import json

        from aspkd_ray import cache
        from aspkd_ray.layout import victim_location
        from aspkd_ray.models.checkpoint import ARCH

        location = victim_location(cfg)
        if not cache.exists(location, ARCH):
            return None  # make_victim then says what is missing
        arch = cache.local_copy(location, ARCH) / ARCH
        return json.loads(arch.read_text())["num_classes"]

    def predict_classes(self, images: np.ndarray) -> np.ndarray:
        """The victim's class for each uint8 N x H x W x C image (int64 N)."""
        answers = self._answers(images)
        return answers if self.output == "hard" else answers.argmax(1).astype(np.int64)

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """The victim's probabilities (float32 N x C); a hard-label victim has none."""
        if self.output == "hard":
            raise ValueError("victim.output is 'hard': the victim returns class ids only, so "
                             "there are no probabilities to give; use predict_classes.")
        return self._answers(images)

    def _answers(self, images: np.ndarray) -> np.ndarray:
        from aspkd_ray.teacher.checks import check_answer
        from aspkd_ray.teacher.victims import victim_input

        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(f"images must be uint8 N x H x W x C, got {images.dtype} "
                             f"{images.shape}.")
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start:start + self.batch_size]
            raw = self.victim.predict(victim_input(batch, self.cfg))
            out.append(check_answer(raw, len(batch), self.num_classes, self.output))
        if out:
            return np.concatenate(out)
        return (np.zeros(0, np.int64) if self.output == "hard"
                else np.zeros((0, self.num_classes), np.float32))
