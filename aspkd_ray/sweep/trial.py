"""One sweep trial: one ASPKD attack whose every round is reported to Ray Tune.

A trial runs `open_attack` and `attack_rounds` of `aspkd steal` on its own storage root
(`trials/<trial id>/` under the sweep's), sharing the sweep's proxy set, teacher service and
ledger. Each round's metrics reach Tune through Ray Train's Tune callback, so a scheduler can
stop the trial after any round. The trial never evaluates against the real test set with the
attacker objective: the sweep's driver does that after the trials (`tune.run_sweep`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ray.tune.integration.ray_train import TuneReportCallback

from aspkd_ray.config import Config, from_dict
from aspkd_ray.layout import join
from aspkd_ray.sweep.spec import SweepSpec
from aspkd_ray.train.attack import SharedValidation


@dataclass
class SweepContext:
    """What every trial gets besides its parameters (through `tune.with_parameters`)."""

    spec: SweepSpec
    root: str                    # the sweep's storage root
    proxy_dir: str               # folder holding the shared proxy/ set
    ledger: str                  # the shared ledger
    service_budget: int          # the shared teacher service's cap (the sweep's)
    pins: list[str] = field(default_factory=list)  # paths and settings the driver resolved
    validation: SharedValidation | None = None     # attacker objective: bought once

    def trial_root(self, trial: str) -> str:
        return join(self.root, "trials", trial)


def param_overrides(params: dict) -> list[str]:
    """A trial's parameters as `key=value` overrides."""
    return [f"{k}={json.dumps(v)}" for k, v in sorted(params.items())]


def trial_config(ctx: SweepContext, params: dict, trial: str) -> Config:
    """The trial's Config: base + overrides + its parameters, pinned to the sweep's shared
    proxy set, ledger and service, with its own storage root (trials/<trial>)."""
    from aspkd_ray import storage

    own = ctx.trial_root(trial)
    pins = ctx.pins + [f"storage.root={json.dumps(own)}",
                       f"proxy.dir={json.dumps(ctx.proxy_dir)}",
                       f"budget.ledger={json.dumps(ctx.ledger)}"]
    if not storage.is_uri(own):
        pins.append(f"output_dir={json.dumps(own)}")
    return from_dict(ctx.spec.base, ctx.spec.overrides + param_overrides(params) + pins)


def run_trial(params: dict, ctx: SweepContext) -> None:
    """The Tune trainable: one attack, every round reported (`round_done`, `calls_used`,
    `val_agreement` with the attacker objective, `agreement` with the research one)."""
    import ray.tune

    from aspkd_ray.jobs.steal import Stopwatch, attack_rounds, open_attack

    trial = ray.tune.get_context().get_trial_id()
    cfg = trial_config(ctx, params, trial)
    attack = open_attack(cfg, Stopwatch(), trial=trial, service_budget=ctx.service_budget)
    attack_rounds(attack, trial=trial, service_budget=ctx.service_budget,
                  objective=ctx.validation,
                  callbacks=[RoundReport(cfg, attack.num_classes,
                                         research=ctx.spec.objective == "research")])


class RoundReport(TuneReportCallback):
    """Tune's callback for Ray Train, reporting rank 0's round metrics without the per-rank
    details (a list Tune's loggers cannot store); with the research objective, plus the
    round student's test agreement with the victim (the experimenter's oracle, used in the
    Train controller)."""

    def __init__(self, cfg: Config, num_classes: int, research: bool) -> None:
        super().__init__()
        self.cfg, self.num_classes, self.research, self.judge = cfg, num_classes, research, None

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if metrics:
            first = {k: v for k, v in metrics[0].items() if k != "workers"}
            if self.research and checkpoint is not None:
                from aspkd_ray.evaluation.rounds import TestJudge

                if self.judge is None:
                    self.judge = TestJudge(self.cfg, self.num_classes)
                first["agreement"] = self.judge.agreement(checkpoint)
            metrics = [first, *metrics[1:]]
        super().after_report(run_context, metrics, checkpoint)
