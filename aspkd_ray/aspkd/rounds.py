"""Algorithm 1: the ASPKD round loop, readable top to bottom.

    for each of r rounds:
        a. active selection: embed the unlabelled pool X'' with the student encoder S̄, pick
           s/|C| images per class with probability ∝ exp(-Δ/(2σ²))
        b. query: buy their labels from the teacher; move them from X'' to X'
        c. distil the student on X'
        d. self-paced pseudo-labels: kNN in S̄ space from X'' to X', drop disagreements with
           the generation class
        e. distil the student on X' ∪ X''

Pure algorithm: the teacher is a `buy(pool_indices) -> labels` callable, the proxy pool is a
`Pool` (embed it, predict it, fit on these ids; `ProxyPool` holds it in memory, and
`aspkd_ray.pool.StreamedPool` reads it from storage), and distributed training is a `Comm`
(identity on one process). The Ray layer supplies all three.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import nn

from aspkd_ray.aspkd.distill import FitResult, accuracy, embed, fit, predict_logits
from aspkd_ray.aspkd.prior import class_weights, correct_soft_labels, teacher_prior
from aspkd_ray.aspkd.pseudo_labels import PseudoLabelInput, get_pseudo_label_rule
from aspkd_ray.aspkd.selection import SelectionInput, get_selection, teacher_prior_share
from aspkd_ray.config import ASPKDConfig, Config, TrainingConfig

log = logging.getLogger(__name__)


class Pool(Protocol):
    """What the round loop does with the proxy pool's train split (ids are its positions)."""

    classes: np.ndarray          # generation class of each train image

    def embed(self, model: nn.Module) -> np.ndarray:
        """The latent S̄(x) of every train image (N x D)."""

    def predict(self, model: nn.Module) -> np.ndarray:
        """The model's class for every train image (N)."""

    def predict_proba(self, model: nn.Module) -> np.ndarray:
        """The model's class probabilities for every train image (N x C)."""

    def fit(self, model: nn.Module, idx: np.ndarray | None, targets: torch.Tensor,
            training: TrainingConfig, **kwargs) -> FitResult:
        """Train on the images `idx` (None: all) with `targets`; kwargs as `distill.fit`."""

    def validator(self, val_labels: np.ndarray | None) -> Callable[[nn.Module], float]:
        """The early stopping score on the validation split: accuracy against generation
        classes, or agreement with bought validation labels when given."""


@dataclass
class ProxyPool:
    """The pool in memory: proxy images and their generation classes, nothing else."""

    x: torch.Tensor              # train split, float N x C x H x W in [0, 1]
    classes: np.ndarray          # generation class of each train image
    x_val: torch.Tensor          # validation split (early stopping, model selection)
    classes_val: np.ndarray

    def embed(self, model: nn.Module) -> np.ndarray:
        return embed(model, self.x).numpy()

    def predict(self, model: nn.Module) -> np.ndarray:
        return predict_logits(getattr(model, "module", model), self.x).argmax(1).numpy()

    def predict_proba(self, model: nn.Module) -> np.ndarray:
        return predict_logits(getattr(model, "module", model), self.x).softmax(1).numpy()

    def fit(self, model: nn.Module, idx: np.ndarray | None, targets: torch.Tensor,
            training: TrainingConfig, **kwargs) -> FitResult:
        x = self.x if idx is None else self.x[torch.as_tensor(idx)]
        return fit(model, x, targets, training, **kwargs)

    def keep_val(self, keep: np.ndarray) -> None:
        """Keep only these validation images (the ones whose labels were bought)."""
        self.x_val, self.classes_val = self.x_val[torch.as_tensor(keep)], self.classes_val[keep]

    def validator(self, val_labels: np.ndarray | None) -> Callable[[nn.Module], float]:
        """Accuracy against generation classes on the proxy validation split, or agreement
        with bought validation labels when given: early stopping within the budget."""
        y = torch.as_tensor(self.classes_val if val_labels is None else val_labels)
        return lambda model: accuracy(model, self.x_val, y)


@dataclass
class RoundSettings:
    """The round loop's settings: the config's aspkd and training sections as they are (the
    schema holds every default), and what a job derives from the config and the proxy set.
    Build it with `from_config`."""

    aspkd: ASPKDConfig
    training: TrainingConfig
    num_classes: int
    budget: int                  # calls in all, a bought validation subset included
    rounds: int
    output: str                  # "soft" | "hard": what the teacher returns
    flip: bool                   # horizontal flips in augmentation
    seed: int
    pretrain: bool               # init: pre-train on generation classes before round 1

    @classmethod
    def from_config(cls, cfg: Config, num_classes: int, budget: int) -> RoundSettings:
        from aspkd_ray.config import num_rounds
        from aspkd_ray.layout import horizontal_flip
        from aspkd_ray.teacher.defences import served_output

        # what the teacher sells: class ids under a label-only defence (top1)
        return cls(aspkd=cfg.aspkd, training=cfg.training, num_classes=num_classes,
                   budget=budget, rounds=num_rounds(cfg, num_classes),
                   output=served_output(cfg), flip=horizontal_flip(cfg), seed=cfg.seed,
                   pretrain=cfg.student.pretrain == "proxy_prompts")

    @property
    def prompt_only(self) -> bool:
        """The paper's conventional baseline: generation classes as labels, no calls."""
        return self.aspkd.baseline == "prompt_only"

    @property
    def val_per_class(self) -> int:
        """Calls per class for a bought validation subset (training.early_stopping)."""
        t = self.training
        return t.bought_val_per_class if t.early_stopping == "bought_val" else 0

    @property
    def knn_distance(self) -> str:
        return self.aspkd.distance or ("cosine" if self.output == "soft" else "euclidean")

    def calls_in_round(self, r: int, spent_on_val: int = 0) -> int:
        """n / r calls per round of what the validation subset left; the remainder goes to
        the last round."""
        budget = self.budget - spent_on_val
        base = budget // self.rounds
        return base + (budget - base * self.rounds if r == self.rounds - 1 else 0)


@dataclass
class AttackState:
    """Everything the attack knows; saved after every round so a run can resume."""

    round: int = 0                                   # rounds completed
    bought_idx: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    bought_labels: np.ndarray | None = None          # N_b x C floats (soft) or N_b ints
    history: list[dict] = field(default_factory=list)
    pseudo: list[dict] = field(default_factory=list)  # per round: pool idx and classes
    pretrain: dict | None = None                     # the init step's fit, once done
    bought_val: dict | None = None                   # {idx, labels}: bought validation
    torch_rng: np.ndarray | None = None              # torch's CPU generator after the round


class Comm:
    """One process: nothing to share. Ray Train workers use `train.comm.TorchDistComm`,
    which has the same interface."""

    rank = 0
    world_size = 1

    def broadcast(self, obj):
        return obj


def bought_targets(labels: np.ndarray, output: str) -> torch.Tensor:
    """Teacher answers as training targets: distributions (soft) or class ids (hard)."""
    if output == "hard":
        if labels.ndim != 1 or np.issubdtype(labels.dtype, np.floating):
            raise TypeError("hard-label teacher answers must be class ids, never probabilities")
        return torch.as_tensor(labels, dtype=torch.long)
    return torch.as_tensor(labels, dtype=torch.float32)


class _Once:
    """A value computed on the first call and kept."""

    def __init__(self, make: Callable[[], np.ndarray]) -> None:
        self.make, self.value = make, None

    def __call__(self) -> np.ndarray:
        if self.value is None:
            self.value = self.make()
        return self.value


def pick_bought_val(classes_val: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """The validation images whose labels are bought: `per_class` of each class, seeded."""
    rng = np.random.default_rng([seed, 7])
    picks = [rng.permutation(np.flatnonzero(classes_val == c))[:per_class]
             for c in np.unique(classes_val)]
    return np.sort(np.concatenate(picks)) if picks else np.zeros(0, np.int64)


def run_rounds(student: nn.Module, pool: Pool, s: RoundSettings,
               buy: Callable[..., np.ndarray], *, comm: Comm | None = None,
               state: AttackState | None = None,
               on_round: Callable[[AttackState, nn.Module], None] | None = None) -> AttackState:
    """Run (or resume) Algorithm 1 on `student` in place and return the attack state.

    `buy(idx)` returns the teacher's labels for those train-pool images (soft: N x C floats;
    hard: N ints), `buy(idx, "val")` for validation images. Only rank 0 buys and selects;
    decisions are broadcast so every rank trains on the same data. `on_round(state,
    student)` runs after each round (saving).
    """
    comm = comm or Comm()
    state = state or AttackState()
    n = len(pool.classes)
    if state.torch_rng is not None:
        # Dropout draws from torch's global generator: a resumed run continues it from where
        # the interrupted one saved it, so its students are those of an uninterrupted run.
        torch.set_rng_state(torch.as_tensor(state.torch_rng, dtype=torch.uint8))

    # 1. a teacher-labelled validation subset (training.early_stopping=bought_val), paid for
    # from the budget like any other label; early stopping then scores agreement with it.
    if s.val_per_class and not s.prompt_only and state.bought_val is None:
        bought = None
        if comm.rank == 0:
            vb = pick_bought_val(pool.classes_val, s.val_per_class, s.seed)
            answers = buy(vb, "val")
            bought = {"idx": vb, "labels": answers if answers.ndim == 1 else answers.argmax(1)}
        state.bought_val = comm.broadcast(bought)
    val_labels = None
    if state.bought_val is not None:
        pool.keep_val(state.bought_val["idx"])
        val_labels = state.bought_val["labels"]
    spent_on_val = 0 if state.bought_val is None else len(state.bought_val["idx"])
    validate = pool.validator(val_labels)

    def fit_on(idx, targets, seed, weights=None):
        return pool.fit(student, idx, targets, s.training, validate=validate, flip=s.flip,
                        seed=seed, rank=comm.rank, world_size=comm.world_size,
                        class_weights=weights)

    def fit_prompt_labels():
        return fit_on(None, torch.as_tensor(pool.classes, dtype=torch.long), s.seed)

    if s.prompt_only:  # the paper's "conventional" baseline: no teacher at all
        res = fit_prompt_labels()
        state.round = 1
        state.history.append({"round": 0, "bought": 0, "val_score": res.best_score,
                              "epochs": res.epochs_run, "train_size": n})
        if on_round:
            on_round(state, student)
        return state

    # 2. init: the paper starts from a pre-trained student; generation classes are free
    # labels, so pre-training on them gives round 1 a latent space worth selecting in.
    if s.pretrain and state.round == 0 and state.pretrain is None:
        res = fit_prompt_labels()
        state.pretrain = {"val_score": res.best_score, "epochs": res.epochs_run}
        log.info("init: pre-trained on generation classes, %s", state.pretrain)

    for r in range(state.round, s.rounds):
        t0 = time.time()
        # Round seeds derive from (seed, round): a resumed run picks what a full run picks.
        rng = np.random.default_rng([s.seed, r])
        unlabelled = np.setdiff1d(np.arange(n), state.bought_idx)
        quota = min(s.calls_in_round(r, spent_on_val), len(unlabelled))

        # a. active selection (rank 0 decides, everyone learns the picks)
        picks, latents_mb = None, None
        if comm.rank == 0:
            latents = _Once(lambda: pool.embed(student))  # only strategies that need them
            sel = get_selection(s.aspkd.selection)(SelectionInput(
                quota=quota, classes=pool.classes, candidates=unlabelled,
                num_classes=s.num_classes, rng=rng, latents=latents,
                predicted=lambda: pool.predict(student), settings=s.aspkd,
                probabilities=lambda: pool.predict_proba(student),
                class_share=_class_share(s, pool.classes, state)))
            if latents.value is not None:
                latents_mb = round(latents.value.nbytes / 2**20, 2)
            del latents
            picks = np.asarray(sel.indices, dtype=np.int64)
            # b. query the teacher; move the picks from X'' to X'
            labels = buy(picks)
            if state.bought_labels is None:
                state.bought_labels = labels
            else:
                state.bought_labels = np.concatenate([state.bought_labels, labels])
            state.bought_idx = np.concatenate([state.bought_idx, picks])
        state.bought_idx, state.bought_labels = comm.broadcast(
            (state.bought_idx, state.bought_labels))

        # c. distil on X' (teacher labels, prior-corrected when asked: aspkd/prior.py)
        labels, weights = state.bought_labels, None
        if s.aspkd.prior_correction:
            prior = teacher_prior(labels, s.num_classes)
            if s.output == "soft":
                labels = correct_soft_labels(labels, prior)
            else:
                weights = torch.as_tensor(class_weights(prior))
        y_bought = bought_targets(labels, s.output)
        res_c = fit_on(state.bought_idx, y_bought, s.seed + 1000 * r, weights)
        row = {"round": r, "bought": int(len(state.bought_idx)), "bought_this_round": quota,
               "val_score_labelled": res_c.best_score, "epochs_labelled": res_c.epochs_run}
        if latents_mb is not None:  # the pool's latents (rank 0 holds them for selection)
            row["latents_mb"] = latents_mb

        # d. self-paced pseudo-labels on X'', recomputed every round since S̄ changed
        if s.aspkd.self_paced:
            unlabelled = np.setdiff1d(np.arange(n), state.bought_idx)
            pseudo = None
            if comm.rank == 0:
                latents = pool.embed(student)
                pl = get_pseudo_label_rule(s.aspkd.pseudo_labels)(PseudoLabelInput(
                    query=latents[unlabelled], reference=latents[state.bought_idx],
                    reference_labels=labels, generation_classes=pool.classes[unlabelled],
                    mode=s.output, num_classes=s.num_classes, distance=s.knn_distance,
                    settings=s.aspkd,
                    student_classes=lambda u=unlabelled: pool.predict(student)[u]))
                pseudo = (unlabelled[pl.kept], pl.labels[pl.kept], pl.classes[pl.kept],
                          float(pl.filter_rate))
            p_idx, p_labels, p_classes, filter_rate = comm.broadcast(pseudo)
            state.pseudo.append({"round": r, "idx": p_idx, "classes": p_classes})

            # e. distil on X' ∪ X''
            idx = np.concatenate([state.bought_idx, p_idx])
            y_all = torch.cat([y_bought, bought_targets(p_labels, s.output)])
            res_e = fit_on(idx, y_all, s.seed + 1000 * r + 1, weights)
            row.update({"pseudo_labelled": int(len(p_idx)), "filter_rate": filter_rate,
                        "val_score": res_e.best_score, "epochs_all": res_e.epochs_run})
        else:
            row["val_score"] = res_c.best_score
        row["round_time_s"] = round(time.time() - t0, 2)
        state.history.append(row)
        state.round = r + 1
        state.torch_rng = torch.get_rng_state().numpy()
        log.info("round %d/%d: %s", r + 1, s.rounds, row)
        if on_round:
            on_round(state, student)
    return state


def _class_share(s, classes: np.ndarray, state) -> np.ndarray | None:
    """Quota weights from the teacher's answers so far (aspkd.quotas: teacher_prior)."""
    if s.aspkd.quotas != "teacher_prior" or state.bought_labels is None:
        return None
    return teacher_prior_share(classes[state.bought_idx], state.bought_labels, s.num_classes)
