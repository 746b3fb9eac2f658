"""Evaluating an attack's rounds: each round's student against the victim on the real test
set, and the kept pseudo-labels against what the victim says of those proxy images. Runs
after the attack, through the oracle, which the attack never sees."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from aspkd_ray.config import Config
from aspkd_ray.evaluation.report import agreement


@dataclass
class Evaluation:
    rounds: list[dict]                  # per round: agreement, calls_used and its metrics
    pseudo_label_agreement: list[float]  # per round, % of kept pseudo-labels the victim shares
    victim_test: np.ndarray             # the victim's class for every test image
    final_classes: np.ndarray | None    # the last student's class for every test image
    state: object | None                # the last round's AttackState
    student: torch.nn.Module | None     # the last round's student
    example: torch.Tensor | None = field(default=None, repr=False)  # a few test inputs


class TestJudge:
    """The experimenter's view: the victim's class for every real test image, and a
    student's agreement with it. Built only where the oracle may be used (never in an
    attack, nor in a sweep trial with the attacker objective)."""

    def __init__(self, cfg: Config, num_classes: int) -> None:
        from aspkd_ray.datasets import load_victim_data, to_tensor
        from aspkd_ray.evaluation.oracle import EvaluationOracle
        from aspkd_ray.layout import input_shape
        from aspkd_ray.models import create_model

        self.size, self.chans = input_shape(cfg)
        self.oracle = EvaluationOracle(cfg)
        test = load_victim_data(cfg.dataset.name, "test", cfg.dataset.root,
                                cfg.dataset.download, self.size)
        self.x_test = to_tensor(test.images, self.size, self.chans)
        self.victim_test = self.oracle.predict_classes(test.images)
        self.student = create_model(cfg.student.architecture, num_classes=num_classes,
                                    in_chans=self.chans, image_size=self.size).eval()

    def classes(self, weights: dict) -> np.ndarray:
        """The student with these weights: its class for every test image."""
        from aspkd_ray.aspkd.distill import predict_logits

        self.student.load_state_dict(weights)
        return predict_logits(self.student, self.x_test).argmax(1).numpy()

    def agreement(self, checkpoint) -> float:
        """% test agreement of a round checkpoint's student with the victim."""
        from aspkd_ray.train.attack import load_round

        return agreement(self.classes(load_round(checkpoint)[1]), self.victim_test)


def evaluate_rounds(cfg: Config, rounds: list, proxy, num_classes: int) -> Evaluation:
    """`rounds`: run_attack's (checkpoint, metrics) per round; `proxy`: the OpenPool the
    attack used (its images are read chunk by chunk for the pseudo-label check)."""
    from aspkd_ray.train.attack import load_round

    judge = TestJudge(cfg, num_classes)
    rows, final, state = [], None, None
    for checkpoint, metrics in rounds:
        state, weights = load_round(checkpoint)
        final = judge.classes(weights)
        val_calls = 0 if state.bought_val is None else len(state.bought_val["idx"])
        rows.append({"round": state.round - 1, "agreement": agreement(final, judge.victim_test),
                     "calls_used": int(len(state.bought_idx)) + val_calls,
                     **{k: v for k, v in metrics.items() if k not in ("round", "round_done")}})
    pseudo = state.pseudo if state else []
    return Evaluation(rows, _pseudo_agreement(pseudo, proxy, judge.oracle, judge.size,
                                              judge.chans),
                      judge.victim_test, final, state, judge.student if state else None,
                      judge.x_test[:4])


def _pseudo_agreement(pseudo: list[dict], proxy, oracle, size: int, chans: int) -> list[float]:
    """The victim's view of the pseudo-labelled images only, read chunk by chunk."""
    asked = np.unique(np.concatenate([p["idx"] for p in pseudo])) if pseudo else []
    victim = np.full(len(proxy.train), -1, np.int64)
    if len(asked):
        victim[asked] = proxy.read_chunked(proxy.train[asked], oracle.predict_classes, size,
                                           chans)
    return [agreement(p["classes"], victim[p["idx"]]) if len(p["idx"]) else float("nan")
            for p in pseudo]
