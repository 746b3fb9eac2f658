"""One cell of the benchmark: one (scenario, method, budget, seed) attack, in process, by
the product's round loop, with the victim behind a metered teacher.

Cells of one scenario and seed that start from the init step share it (`init_step`): the
step is run once and each cell resumes from its saved state, exactly as an interrupted
attack resumes, so they all start from the same student without recomputing it.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch

from aspkd_ray.aspkd.rounds import AttackState, RoundSettings, run_rounds
from aspkd_ray.config import Config, total_budget
from aspkd_ray.evaluation.report import agreement
from aspkd_ray.quality.methods import get_method
from aspkd_ray.quality.scenario import Scenario
from aspkd_ray.teacher.budget import plan_request
from aspkd_ray.teacher.errors import BudgetExhausted
from aspkd_ray.teacher.ledger import LedgerState


@dataclass(frozen=True)
class Cell:
    scenario: str
    method: str
    calls_per_class: int | None  # None: a method that does not depend on the budget
    seed: int

    @property
    def key(self) -> tuple:
        return (self.scenario, self.method, self.calls_per_class, self.seed)


@dataclass
class InitState:
    """The init step's result for one scenario and seed: what a cell resumes from."""

    weights: dict
    info: dict
    torch_rng: np.ndarray


class Meter:
    """The teacher of an in-process attack: the victim's answers behind the teacher
    service's own budget rule (`teacher.budget.plan_request`). Only what is paid for leaves
    it, and a request over the budget is refused whole."""

    def __init__(self, answers: np.ndarray, budget: int, output: str) -> None:
        self.answers, self.budget = answers, budget
        self.state = LedgerState(output=output)
        self.queries: list[int] = []  # pool rows as first bought, in order

    def __call__(self, idx: np.ndarray, split: str = "train") -> np.ndarray:
        if split != "train":
            raise ValueError("the benchmark's attacks buy train-pool labels only "
                             "(training.early_stopping=bought_val is not supported here)")
        idx = np.asarray(idx, dtype=np.int64)
        ids = list(dict.fromkeys(str(i) for i in idx))
        plan = plan_request(ids, self.state, self.budget, "", None)
        if plan.refused:
            raise BudgetExhausted(f"{len(plan.refused)} of {len(ids)} labels refused: the "
                                  f"budget of {self.budget} calls is spent", [],
                                  self.answers[:0], ids)
        n = len(plan.granted)
        self.state.apply_reserve(plan.granted, [0] * n, [""] * n,
                                 [i in plan.new_charges for i in plan.granted])
        self.queries += [int(i) for i in plan.granted if i in plan.new_charges]
        return self.answers[idx]

    @property
    def calls_used(self) -> int:
        return len(self.state.charged)


def cell_config(scn: Scenario, cell: Cell) -> Config:
    method = get_method(cell.method)
    budget = [] if cell.calls_per_class is None else \
        [f"budget.calls_per_class={cell.calls_per_class}"]
    if cell.method == "teacher_all":  # every image of the pool
        budget = [f"budget.total={len(scn.pools['proxy'].classes)}"]
    return scn.cell_config([*method.overrides, *budget, f"seed={cell.seed}"])


def new_student(cfg: Config, num_classes: int) -> torch.nn.Module:
    """The seed's student init, as an attack makes it (`train.attack`)."""
    from aspkd_ray.layout import input_shape
    from aspkd_ray.models import create_model

    size, chans = input_shape(cfg)
    torch.manual_seed(cfg.seed)
    return create_model(cfg.student.architecture, num_classes=num_classes, in_chans=chans,
                        image_size=size)


def needs_init(cfg: Config) -> bool:
    """Whether a cell with this config starts from the scenario's init step."""
    return cfg.student.pretrain == "proxy_prompts" and cfg.aspkd.baseline != "prompt_only"


def init_step(scn: Scenario, seed: int) -> InitState:
    """The init step (pre-training on generation classes) of the scenario's config."""
    cfg = scn.cell_config([f"seed={seed}", "student.pretrain=proxy_prompts"])
    student = new_student(cfg, scn.num_classes)
    s = RoundSettings.from_config(cfg, scn.num_classes, 1)
    state = run_rounds(student, scn.pools["proxy"], dataclasses.replace(s, rounds=0),
                       _no_teacher)
    return InitState({k: v.clone() for k, v in student.state_dict().items()},
                     state.pretrain, torch.get_rng_state().numpy())


def _no_teacher(idx, split="train"):
    raise AssertionError("the init step buys nothing")


def run_cell(scn: Scenario, cell: Cell, init: InitState | None = None) -> dict:
    """Run one cell and return its row. `init`: the scenario's init step for this seed,
    for methods that start from it (computed here when not given)."""
    t0 = time.time()
    method = get_method(cell.method)
    cfg = cell_config(scn, cell)
    pool = scn.pools[method.pool]
    prompt_only = cfg.aspkd.baseline == "prompt_only"
    budget = 0 if prompt_only else total_budget(cfg, scn.num_classes)
    s = RoundSettings.from_config(cfg, scn.num_classes, max(budget, 1))
    student = new_student(cfg, scn.num_classes)
    state = None
    if needs_init(cfg):
        init = init or init_step(scn, cell.seed)
        student.load_state_dict(init.weights)
        state = AttackState(pretrain=init.info, torch_rng=init.torch_rng)
    meter = Meter((scn.served or scn.answers)[method.pool, s.output], budget, s.output)
    by_round = []
    state = run_rounds(student, pool, s, meter, state=state,
                       on_round=lambda st, model: by_round.append(_test_agreement(scn, model)))
    victim_pool = scn.victim_classes(method.pool)
    pseudo = [agreement(p["classes"], victim_pool[p["idx"]]) if len(p["idx"]) else None
              for p in state.pseudo]
    last = state.history[-1]
    return {"scenario": cell.scenario, "method": cell.method, "output": s.output,
            "calls_per_class": cell.calls_per_class, "seed": cell.seed,
            "agreement": by_round[-1], "agreement_by_round": by_round,
            "calls_used": meter.calls_used, "budget": budget,
            "pseudo_label_agreement": pseudo[-1] if pseudo else None,
            "pseudo_label_agreement_by_round": pseudo,
            "filter_rate": last.get("filter_rate"), "rounds": len(by_round),
            "wall_s": round(time.time() - t0, 1),
            **({"queries": meter.queries} if scn.record_queries else {})}


def _test_agreement(scn: Scenario, model: torch.nn.Module) -> float:
    from aspkd_ray.aspkd.distill import predict_logits

    classes = predict_logits(model, scn.x_test).argmax(1).numpy()
    return round(agreement(classes, scn.victim_test), 2)
