"""Training a network on images with soft or hard targets, with real early stopping.

Used for the victim (hard ground-truth labels) and for every distillation step of ASPKD
(soft teacher distributions, or hard teacher labels). Pure torch; Ray Train calls it with a
shard of the data and a DDP-wrapped model.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from aspkd_ray.config import TrainingConfig
from aspkd_ray.datasets.tensors import augment

log = logging.getLogger(__name__)


def distillation_loss(logits: torch.Tensor, targets: torch.Tensor,
                      class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy with a teacher distribution (N x C floats) or class ids (N ints);
    `class_weights` (C) weighs hard targets by class."""
    if targets.dtype.is_floating_point:
        return -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()
    return F.cross_entropy(logits, targets, weight=class_weights)


def make_optimizer(params, cfg: TrainingConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Logits for x in eval mode, batched; returns CPU tensor."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = [model(x[i:i + batch_size].to(device)).float().cpu()
           for i in range(0, len(x), batch_size)]
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def embed(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """The latent S̄(x) of every image (one flat vector each), batched, CPU float32."""
    net = getattr(model, "module", model)
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    out = [net.embed(x[i:i + batch_size].to(device)).float().cpu()
           for i in range(0, len(x), batch_size)]
    net.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """% of x whose argmax prediction equals y (class ids)."""
    if len(x) == 0:
        return float("nan")
    return float((predict_logits(model, x).argmax(1) == y).float().mean() * 100)


@dataclass
class FitResult:
    best_epoch: int
    best_score: float
    epochs_run: int
    history: list[dict] = field(default_factory=list)


def fit(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, cfg: TrainingConfig, *,
        validate: Callable[[nn.Module], float] | None = None, flip: bool = False,
        seed: int = 0, rank: int = 0, world_size: int = 1,
        class_weights: torch.Tensor | None = None,
        on_epoch: Callable[[dict], None] | None = None) -> FitResult:
    """Train `model` on (x, targets) with Adam/StepLR and early stopping.

    `validate(model) -> score` (higher is better) drives early stopping; the best weights are
    deep-copied and restored at the end (the authors' code kept a reference to the live
    weights and so restored nothing). With `world_size > 1` each rank trains on its own
    shard of every epoch's permutation; `model` is then DDP-wrapped so gradients are shared.
    `class_weights` weighs hard targets by class (the teacher prior correction).
    """
    net = getattr(model, "module", model)
    device = next(net.parameters()).device
    opt = make_optimizer(model.parameters(), cfg)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
    if class_weights is not None:
        class_weights = class_weights.to(device)
    gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator().manual_seed(seed + 1)
    use_es = validate is not None and cfg.early_stopping != "none"
    best_score, best_epoch, best_state, stale = -float("inf"), -1, None, 0
    history: list[dict] = []
    n = len(x)
    epoch = -1
    for epoch in range(cfg.max_epochs):
        model.train()
        # Same permutation on every rank (same seed), then each rank takes its slice.
        perm = torch.randperm(n, generator=gen)
        per_rank = -(-n // world_size)  # ceil: ranks see equally many batches
        perm = perm.repeat(2)[rank * per_rank:(rank + 1) * per_rank] if world_size > 1 else perm
        total, count = 0.0, 0
        for i in range(0, len(perm), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            xb = x[idx]
            if cfg.augment:
                xb = augment(xb, aug_gen, flip=flip)
            loss = distillation_loss(model(xb.to(device)), targets[idx].to(device),
                                     class_weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            count += len(idx)
        sched.step()
        row = {"epoch": epoch, "loss": total / max(count, 1)}
        if validate is not None:
            row["val_score"] = score = float(validate(model))
            if score > best_score:
                best_score, best_epoch, stale = score, epoch, 0
                best_state = copy.deepcopy(net.state_dict())
            else:
                stale += 1
        history.append(row)
        if on_epoch is not None:
            on_epoch(row)
        if use_es and stale >= cfg.patience:
            break
    if use_es and best_state is not None:
        net.load_state_dict(best_state)
    else:
        best_epoch, best_score = epoch, history[-1].get("val_score", float("nan"))
    return FitResult(best_epoch, best_score, epoch + 1, history)
