"""Training the victim on its real training data (the experimenter's side, not the attack's)."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from aspkd_ray import cache, console, storage
from aspkd_ray.aspkd.distill import accuracy, fit
from aspkd_ray.config import Config, TrainingConfig
from aspkd_ray.datasets import get_spec, load_victim_data, to_tensor
from aspkd_ray.errors import UserError
from aspkd_ray.layout import horizontal_flip, input_shape, victim_location
from aspkd_ray.models import create_model, save_checkpoint
from aspkd_ray.models.checkpoint import ARCH, WEIGHTS

log = logging.getLogger(__name__)

CHECKPOINT_FILES = (ARCH, WEIGHTS)  # what save_checkpoint writes


class VictimMissing(UserError, FileNotFoundError):
    """No victim checkpoint where the config points, and none may be trained there."""

    exit_code = 2  # a config value (victim.checkpoint) points at nothing


def victim_ready(folder: str | Path) -> bool:
    """Whether `folder` (a local folder or a URI) holds a saved victim (both checkpoint
    files; on object storage model.json, written last, says the upload is complete)."""
    if storage.is_uri(str(folder)):
        return all(cache.exists(str(folder), name) for name in CHECKPOINT_FILES)
    folder = Path(folder)
    return all((folder / name).is_file() for name in CHECKPOINT_FILES)


def victim_training_config(cfg: Config) -> TrainingConfig:
    """victim.training, with the paper's per-data-set teacher settings where left default."""
    defaults = TrainingConfig()
    spec = get_spec(cfg.dataset.name)
    given = cfg.victim.training
    merged = {k: v for k, v in spec.victim_training.items()}
    for k, v in given.__dict__.items():
        if v != getattr(defaults, k):  # explicitly set by the user
            merged[k] = v
    return replace(defaults, **merged)


def train_victim(cfg: Config, progress: bool = True) -> dict:
    """Train the victim, save its checkpoint, return a summary with test_accuracy."""
    torch.manual_seed(cfg.seed)
    spec = get_spec(cfg.dataset.name)
    size, chans = input_shape(cfg)
    tcfg = victim_training_config(cfg)
    t0 = time.time()
    train = load_victim_data(cfg.dataset.name, "train", cfg.dataset.root, cfg.dataset.download,
                             size)
    test = load_victim_data(cfg.dataset.name, "test", cfg.dataset.root, cfg.dataset.download,
                            size)
    classes = len(train.class_names) or spec.num_classes
    x, y = to_tensor(train.images, size, chans), torch.from_numpy(train.labels)
    xt, yt = to_tensor(test.images, size, chans), torch.from_numpy(test.labels)
    model = create_model(cfg.victim.architecture, num_classes=classes, in_chans=chans,
                         image_size=size)

    bar = console.progress("victim", tcfg.max_epochs, "epochs") if progress else None

    def on_epoch(row: dict) -> None:
        if progress:
            log.info("victim epoch %d/%d loss %.4f", row["epoch"] + 1, tcfg.max_epochs,
                     row["loss"])
            bar.advance()

    # The victim's own early stopping may use its own held-out data: 10% of its training set.
    g = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(len(x), generator=g)
    n_val = len(x) // 10 if tcfg.early_stopping != "none" else 0
    val_idx, tr_idx = perm[:n_val], perm[n_val:]
    validate = (lambda m: accuracy(m, x[val_idx], y[val_idx])) if n_val else None
    try:
        result = fit(model, x[tr_idx], y[tr_idx], tcfg, validate=validate,
                     flip=horizontal_flip(cfg), seed=cfg.seed, on_epoch=on_epoch)
    finally:
        if bar:
            bar.close()
    test_acc = accuracy(model, xt, yt)
    location = victim_location(cfg)
    remote = storage.is_uri(location)
    # Object storage: written locally first, then published with model.json last, so that
    # no reader on another node ever loads half a checkpoint.
    tmp = tempfile.TemporaryDirectory(prefix="aspkd-victim-") if remote else None
    out = Path(tmp.name) if tmp else Path(location)
    try:
        save_checkpoint(model, out, extra={"class_names": list(train.class_names),
                                           "test_accuracy": test_acc})
        summary = {"test_accuracy": test_acc, "checkpoint": location if remote else str(out),
                   "epochs": result.epochs_run, "train_images": len(tr_idx),
                   "test_images": len(xt), "wall_time_s": round(time.time() - t0, 1),
                   "architecture": cfg.victim.architecture, "dataset": cfg.dataset.name}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        if remote:
            cache.publish(out, location, marker=ARCH)
    finally:
        if tmp:
            tmp.cleanup()
    return summary
