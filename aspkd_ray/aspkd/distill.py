"""Training a network on images with soft or hard targets, with real early stopping.

Used for the victim (hard ground-truth labels) and for every distillation step of ASPKD
(soft teacher distributions, or hard teacher labels). Pure torch: `fit` trains on tensors in
memory, `fit_batches` on batches from any source (a streamed proxy pool); a Ray Train worker
passes its rank and a DDP-wrapped model.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator
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


class WeightAverage:
    """An exponential moving average of a model's floating-point parameters and buffers
    (running statistics follow the average too), updated after every optimiser step. With
    `warmup` the decay of step t is min(decay, (1 + t) / (10 + t)), so a fit of a few steps
    (a round's first fit on 20 bought images) is not pinned to its starting weights."""

    def __init__(self, net: nn.Module, decay: float, warmup: bool = True) -> None:
        self.decay, self.warmup, self.steps = decay, warmup, 0
        self.avg = {k: v.detach().clone() for k, v in net.state_dict().items()
                    if v.dtype.is_floating_point}

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps)) if self.warmup \
            else self.decay
        for k, v in net.state_dict().items():
            if k in self.avg:
                self.avg[k].mul_(d).add_(v.detach(), alpha=1 - d)

    def copy_to(self, net: nn.Module) -> None:
        net.load_state_dict({**net.state_dict(), **self.avg})


Batches = Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]


def fit(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, cfg: TrainingConfig, *,
        validate: Callable[[nn.Module], float] | None = None, flip: bool = False,
        seed: int = 0, rank: int = 0, world_size: int = 1,
        class_weights: torch.Tensor | None = None,
        on_epoch: Callable[[dict], None] | None = None) -> FitResult:
    """Train `model` on (x, targets) held in memory; see `fit_batches`.

    With `world_size > 1` every rank draws the same permutation of each epoch and takes its
    slice of every global batch of `cfg.batch_size`: the configured batch size is the global
    batch, so training follows the same schedule on any number of workers.
    """
    gen = torch.Generator().manual_seed(seed)
    n = len(x)

    def epoch_batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        perm = torch.randperm(n, generator=gen)  # same on every rank (same seed)
        for idx in rank_batches(perm, cfg.batch_size, rank, world_size):
            yield x[idx], targets[idx]

    return fit_batches(model, epoch_batches, cfg, validate=validate, flip=flip, seed=seed,
                       class_weights=class_weights, on_epoch=on_epoch)


def rank_batches(order: torch.Tensor, batch_size: int, rank: int,
                 world_size: int) -> Iterator[torch.Tensor]:
    """This rank's slice of each global batch of `order`: every rank gets as many batches of
    the same size (DDP needs it); a short last batch wraps round to fill every slice."""
    if world_size == 1:
        yield from (order[i:i + batch_size] for i in range(0, len(order), batch_size))
        return
    n = len(order)
    per = max(1, -(-batch_size // world_size))  # ceil: each rank's share of a global batch
    for i in range(0, n, per * world_size):
        share = -(-min(per * world_size, n - i) // world_size)  # equal on every rank
        yield order[(i + rank * share + torch.arange(share)) % n]


def fit_batches(model: nn.Module, epoch_batches: Batches, cfg: TrainingConfig, *,
                validate: Callable[[nn.Module], float] | None = None, flip: bool = False,
                seed: int = 0, class_weights: torch.Tensor | None = None,
                on_epoch: Callable[[dict], None] | None = None) -> FitResult:
    """Train `model` on `epoch_batches(epoch)` (this rank's (x, targets) batches) with
    Adam/StepLR and early stopping.

    `validate(model) -> score` (higher is better) drives early stopping; the best weights are
    deep-copied and restored at the end (the authors' code kept a reference to the live
    weights and so restored nothing). A DDP-wrapped `model` shares gradients across ranks.
    `class_weights` weighs hard targets by class (the teacher prior correction).
    """
    net = getattr(model, "module", model)
    device = next(net.parameters()).device
    opt = make_optimizer(model.parameters(), cfg)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
    if class_weights is not None:
        class_weights = class_weights.to(device)
    aug_gen = torch.Generator().manual_seed(seed + 1)
    use_es = validate is not None and cfg.early_stopping != "none"
    ema = WeightAverage(net, cfg.ema) if cfg.ema else None
    best_score, best_epoch, best_state, stale = -float("inf"), -1, None, 0
    history: list[dict] = []
    epoch = -1
    for epoch in range(cfg.max_epochs):
        model.train()
        total, count = 0.0, 0
        for xb, yb in epoch_batches(epoch):
            if cfg.augment:
                xb = augment(xb, aug_gen, flip=flip)
            loss = distillation_loss(model(xb.to(device)), yb.to(device), class_weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema is not None:
                ema.update(net)
            total += loss.item() * len(yb)
            count += len(yb)
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
        if ema is not None:
            ema.copy_to(net)
        best_epoch, best_score = epoch, history[-1].get("val_score", float("nan"))
    return FitResult(best_epoch, best_score, epoch + 1, history)
