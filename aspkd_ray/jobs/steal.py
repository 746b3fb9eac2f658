"""`aspkd steal`: one ASPKD attack end to end, and its evaluation.

Stages: proxy set (generate or reuse) → teacher service → rounds on Ray Train → evaluation by
the oracle (after the attack, never visible to it) → summary.json, plots and MLflow.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from aspkd_ray import storage
from aspkd_ray.aspkd.rounds import RoundSettings
from aspkd_ray.config import ASPKDConfig, Config, ConfigError, to_dict, total_budget
from aspkd_ray.datasets import get_spec
from aspkd_ray.errors import UserError
from aspkd_ray.layout import input_shape, run_layout, victim_location
from aspkd_ray.teacher.defences import served_output
from aspkd_ray.victim.train import VictimMissing, victim_ready

log = logging.getLogger(__name__)

EMBEDDED = ("digits", "digits-xdomain", "sklearn-digits")


def ensure_victim(cfg: Config, *, train: bool = False) -> Path | str:
    """The victim's checkpoint folder (a URI where cache_dir is on object storage), checked
    (see `check_victim`); trained first where `check_victim` allows it: the embedded
    scenarios' default cache, or `train=True`."""
    from aspkd_ray.victim import train_victim

    if cfg.victim.endpoint:
        return Path("-")
    location = victim_location(cfg)
    folder = location if storage.is_uri(location) else Path(location)
    if check_victim(cfg, train=train):
        log.info("training the %s victim (saved at %s)", cfg.dataset.name, folder)
        train_victim(cfg)
    return folder


def check_victim(cfg: Config, *, train: bool = False) -> bool:
    """Whether the victim must be trained first; raises VictimMissing when it is not there
    and may not be trained here.

    A `victim.checkpoint` the user gave is never trained over silently (a typo would train a
    new victim there): only with `train=True` (`aspkd steal --train-victim`). With
    victim.checkpoint unset, the embedded scenarios train their default cache (the demo).
    """
    from aspkd_ray import cache

    if cfg.victim.endpoint:
        return False
    folder = victim_location(cfg)
    if victim_ready(folder):
        return False
    if train:
        return True
    if cfg.victim.checkpoint:
        there = cache.any_files(folder) if storage.is_uri(folder) else Path(folder).exists()
        what = "does not exist" if not there else "holds no victim checkpoint " \
               "(model.json and model.safetensors, model.json written last)"
        raise VictimMissing(f"victim.checkpoint: {folder} {what}. Point victim.checkpoint "
                            f"at a folder written by `aspkd train-teacher`, or pass "
                            f"--train-victim to train a new victim there.")
    if cfg.dataset.name not in EMBEDDED:
        raise VictimMissing(f"no victim checkpoint for dataset.name={cfg.dataset.name!r} at "
                            f"{folder}; train one with `aspkd train-teacher` (same config), "
                            f"set victim.checkpoint or victim.endpoint, or pass "
                            f"--train-victim.")
    return True


def _proxy_complete(proxy: str) -> bool:
    """The proxy set at `proxy` (a folder or URI) has its manifest (it is complete)."""
    from aspkd_ray.generation.store import has_manifest

    return has_manifest(proxy)


def _class_names(cfg: Config, proxy: str) -> tuple[str, ...]:
    """The attack's classes: the proxy manifest's when the set exists, else the data set's."""
    from aspkd_ray.generation.plan import class_names_for
    from aspkd_ray.generation.store import read_manifest

    if _proxy_complete(proxy):
        names = read_manifest(proxy).get("class_names")
        if names:
            return tuple(names)
    try:
        return class_names_for(cfg)
    except ValueError as exc:  # a data set whose class names come from its files
        raise ConfigError(str(exc)) from None


def _train_pool_size(cfg: Config, proxy: str, names: tuple[str, ...]) -> int:
    """Images in the proxy set's train split (the pool labels are bought from): the
    manifest's count when the set exists, else what the plan will generate."""
    from aspkd_ray.generation.plan import make_plan
    from aspkd_ray.generation.store import read_manifest

    if _proxy_complete(proxy):
        splits = read_manifest(proxy).get("splits") or {}
        if isinstance(splits.get("train"), int):
            return splits["train"]
    plan = make_plan(cfg, names, shard_size=1)  # ids and splits only; no images
    return int((plan.split == "train").sum())


def _budget_key(cfg: Config) -> str:
    if cfg.budget.total is not None:
        return f"budget.total={cfg.budget.total}"
    return f"budget.calls_per_class={cfg.budget.calls_per_class}"


def check_budget(cfg: Config, num_classes: int, pool_size: int) -> int:
    """The calls n, checked against the proxy pool before any call; returns n.

    An attack needs at least one call (aspkd.baseline=prompt_only needs none) and cannot buy
    more labels than there are images to label: a larger budget would buy the whole pool and
    leave nothing for the self-paced step (the summary then reports NaN).
    """
    n = total_budget(cfg, num_classes)
    if cfg.aspkd.baseline == "prompt_only":
        return n
    if n < 1:
        raise ConfigError(f"{_budget_key(cfg)}: an attack buys at least one label; expected "
                          f">= 1 (or aspkd.baseline=prompt_only, which makes no calls).")
    val = 0
    if cfg.training.early_stopping == "bought_val":
        val = cfg.training.bought_val_per_class * num_classes
        if n - val < 1:
            raise ConfigError(f"{_budget_key(cfg)}: {n} calls, but training.bought_val_per_"
                              f"class={cfg.training.bought_val_per_class} x {num_classes} "
                              f"classes spends {val} of them on validation; raise the budget "
                              f"or lower training.bought_val_per_class.")
    if n - val > pool_size:
        raise ConfigError(f"{_budget_key(cfg)}: {n - val} calls for the pool ({num_classes} "
                          f"classes), but the proxy set's train split holds only {pool_size} "
                          f"images (proxy.per_class={cfg.proxy.per_class}, proxy.total="
                          f"{cfg.proxy.total}, proxy.val_fraction={cfg.proxy.val_fraction}); "
                          f"an attack cannot buy more labels than there are images. Lower "
                          f"the budget or raise proxy.per_class / proxy.total.")
    return n


def check_ledger(cfg: Config, uri: str, budget: int, num_classes: int,
                 replay: bool = True) -> None:
    """Open an existing ledger read-only before anything runs: a corrupt one, or one of
    another attack (budget, output, classes), stops the run here, in the driver.

    `replay=False` checks meta.json only: a Tune trial's ledger is the sweep's, opened and
    checked by the shared service that writes it now; replaying it again in every trial
    would be wasted work.
    """
    from aspkd_ray.teacher.errors import LedgerCorrupt
    from aspkd_ray.teacher.ledger import Ledger, check_meta, read_meta

    try:
        meta = read_meta(uri)
        if meta is None:
            return  # a new ledger: the teacher service creates it
        check_meta(uri, meta, budget=budget, output=served_output(cfg),
                   num_classes=num_classes)
        if replay:
            Ledger(uri, create=False).close()  # replays (and checks) every segment
    except UserError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        # The ledger's own checks name the file; this is the fallback for what they miss.
        raise LedgerCorrupt(f"ledger {uri} is corrupt or unreadable ({type(exc).__name__}: "
                            f"{exc}); it is never used, since it could undercount what was "
                            f"spent. Restore it, or point budget.ledger at a new folder to "
                            f"start another attack.") from None


def preflight(cfg: Config, *, train_victim: bool = False,
              service_budget: int | None = None, trial: str | None = None) -> None:
    """Every check that needs no Ray and no model, before anything is generated, trained or
    charged: budget against the pool, the victim (checkpoint or endpoint), the generator
    plugin, an existing ledger. Raises a UserError (one line on the command line)."""
    from aspkd_ray.generation.registry import check_generator
    from aspkd_ray.generation.store import check_files
    from aspkd_ray.teacher.preflight import check_endpoint

    lay = run_layout(cfg)
    if _proxy_complete(lay.proxy):
        check_files(lay.proxy)  # a damaged set is named now, not after Ray and training
    else:
        check_generator(cfg)
    names = _class_names(cfg, lay.proxy)
    prompt_only = cfg.aspkd.baseline == "prompt_only"
    n = check_budget(cfg, len(names), _train_pool_size(cfg, lay.proxy, names))
    check_victim(cfg, train=train_victim)
    if prompt_only:
        return
    if cfg.victim.endpoint:
        check_endpoint(cfg.victim.endpoint, timeout_s=min(cfg.victim.timeout_s, 5.0))
    check_ledger(cfg, lay.ledger, service_budget or n, len(names), replay=trial is None)


def ensure_proxy(cfg: Config) -> str:
    """The proxy set's location (run_layout(cfg).proxy): generated (or resumed) unless a
    complete one is there."""
    from aspkd_ray.generation.ray_generate import generate_proxy_at
    from aspkd_ray.generation.registry import prepare_generator

    proxy = run_layout(cfg).proxy
    if not _proxy_complete(proxy):
        prepare_generator(cfg)  # the kind's own first step (ddpm: train it if missing)
        generate_proxy_at(cfg, proxy)
    return proxy


class Stopwatch(dict):
    """Seconds per stage: `with times("attack"): ...`."""

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t = time.time()
        try:
            yield
        finally:
            self[stage] = round(time.time() - t, 1)


@dataclass
class OpenAttack:
    """An attack ready to start: checked, Ray up, victim and proxy set in place."""

    cfg: Config
    lay: object          # RunLayout
    proxy: object        # OpenPool
    num_classes: int
    n: int               # the attack's calls


def open_attack(cfg: Config, times: Stopwatch, *, trial: str | None = None,
                service_budget: int | None = None, train_victim: bool = False) -> OpenAttack:
    """Stages before the rounds: checks without Ray (`preflight`), the output folder and Ray,
    the victim, the proxy set (generated or reused) opened as a pool, the budget against it."""
    from aspkd_ray.pool import open_pool

    lay = run_layout(cfg)
    preflight(cfg, train_victim=train_victim, service_budget=service_budget, trial=trial)
    _start(cfg, lay)
    with times("victim"):
        ensure_victim(cfg, train=train_victim)
    with times("proxy"):
        proxy = open_pool(cfg, ensure_proxy(cfg), *input_shape(cfg))
    num_classes = len(proxy.class_names) or get_spec(cfg.dataset.name).num_classes
    n = check_budget(cfg, num_classes, len(proxy.train))  # the set as loaded
    return OpenAttack(cfg, lay, proxy, num_classes, n)


def attack_rounds(a: OpenAttack, *, trial: str | None = None,
                  service_budget: int | None = None, objective=None, callbacks=()):
    """The rounds on Ray Train: (teacher client or None, every round's (checkpoint,
    metrics)). `objective`: a sweep's shared validation labels, scored after every round;
    `callbacks`: Ray Train callbacks (a sweep's per-round reports to Tune)."""
    from aspkd_ray.train.attack import run_attack

    teacher = _teacher(a.cfg, a.num_classes, service_budget or a.n, a.lay.ledger, trial)
    job = _attack_job(a.cfg, a.proxy, a.num_classes, a.n, service_budget, a.lay.ledger, trial,
                      objective)
    return teacher, run_attack(job, a.lay.train, callbacks=callbacks)


def run_steal(cfg: Config, *, trial: str | None = None, service_budget: int | None = None,
              train_victim: bool = False) -> dict:
    """Run one attack as configured; write summary.json, plots and MLflow; return the summary.

    `trial` names a client of a shared service (capped by budget.per_trial) whose global cap
    is `service_budget`; without it the run owns its teacher service and stops it at the end
    (its ledger stays). `train_victim` trains a victim at victim.checkpoint when none is
    there (see `check_victim`).
    """
    import mlflow

    from aspkd_ray.evaluation.rounds import evaluate_rounds
    from aspkd_ray.tracking import mlflow_run

    times, t_all = Stopwatch(), time.time()
    a = open_attack(cfg, times, trial=trial, service_budget=service_budget,
                    train_victim=train_victim)
    with mlflow_run(cfg, f"steal-{cfg.dataset.name}", tags={"stage": "steal"}) as run:
        mlflow.log_dict(to_dict(cfg), "config.json")
        with times("attack"):
            teacher, rounds = attack_rounds(a, trial=trial, service_budget=service_budget)
        # Evaluation: the experimenter's oracle, only now, and never handed to the attack.
        with times("evaluation"):
            evaluation = evaluate_rounds(cfg, rounds, a.proxy, a.num_classes)
        calls_used = _calls_used(teacher, trial)
        times["total"] = round(time.time() - t_all, 1)
        summary = build_summary(cfg, evaluation, a.n, a.num_classes, calls_used,
                                a.proxy.mode, times, run.info.run_id, a.lay.root)
        publish(summary, evaluation, a.proxy.class_names, a.num_classes, a.lay)
    return summary


def _start(cfg: Config, lay) -> None:
    """The output folder (local roots), Ray, and the checks that need Ray."""
    from aspkd_ray.runtime import connect
    from aspkd_ray.teacher.service import service_gpus

    if not storage.is_uri(lay.root):
        out = Path(lay.root)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"storage root {out} is a file; expected a folder (new or a "
                              f"run's).")
        out.mkdir(parents=True, exist_ok=True)
    connect(cfg.ray.address, cfg.ray.namespace)
    if cfg.aspkd.baseline != "prompt_only":
        service_gpus(cfg)  # victim.device=cuda on a cluster without a GPU fails here


def _teacher(cfg: Config, num_classes: int, budget: int, ledger: str, trial: str | None):
    """The teacher service (created, with its ledger, if not running); None for the
    prompt-only baseline, which never calls it."""
    from aspkd_ray.teacher import connect_teacher_service

    if cfg.aspkd.baseline == "prompt_only":
        return None
    return connect_teacher_service(cfg, num_classes, budget=budget, ledger_uri=ledger,
                                   trial=trial)


def _calls_used(teacher, trial: str | None) -> int:
    """Calls charged to this attack (this trial's, in a sweep); a standalone run then stops
    its service (the ledger keeps what was bought)."""
    if teacher is None:
        return 0
    status = teacher.status()
    if trial is not None:
        return int(status["trial_spent"].get(trial, 0))
    teacher.shutdown()
    return int(status["spent"])


def _attack_job(cfg: Config, proxy, num_classes: int, n: int, service_budget: int | None,
                ledger: str, trial: str | None, objective=None):
    """What every Ray Train worker of the attack gets."""
    import ray

    from aspkd_ray.train.attack import AttackJob

    prompt_only = cfg.aspkd.baseline == "prompt_only"
    settings = RoundSettings.from_config(cfg, num_classes, 0 if prompt_only else n)
    memory = proxy.mode == "memory"
    return AttackJob(
        cfg=cfg, settings=settings, pool=ray.put(proxy.pool) if memory else proxy.pool,
        ids=[str(i) for i in proxy.ids], classes=proxy.classes, train=proxy.train,
        val=proxy.val, images_ref=ray.put(proxy.images)
        if memory else None, input_shape=input_shape(cfg), num_classes=num_classes,
        budget_total=service_budget or n, ledger_uri=ledger, trial=trial, objective=objective)


def build_summary(cfg: Config, ev, n: int, num_classes: int, calls_used: int,
                  pool_mode: str, times: dict, run_id: str, root: str) -> dict:
    """summary.json: the attack's results, per round and final."""
    import mlflow


    by_round = ev.rounds
    filter_rates = [r.get("filter_rate") for r in by_round if "filter_rate" in r]
    pseudo = ev.pseudo_label_agreement
    return {
        "dataset": cfg.dataset.name,
        "agreement": by_round[-1]["agreement"] if by_round else float("nan"),
        "agreement_by_round": [r["agreement"] for r in by_round],
        "calls_used": int(calls_used),
        "budget": n,
        "calls_per_class": n / num_classes,
        "rounds": by_round,
        "pseudo_label_filter_rate": filter_rates[-1] if filter_rates else None,
        "pseudo_label_filter_rate_by_round": filter_rates,
        "pseudo_label_agreement": pseudo[-1] if pseudo else None,
        "pseudo_label_agreement_by_round": pseudo,
        "victim_output": served_output(cfg),
        "pool_mode": pool_mode,
        "student_pretrain": cfg.student.pretrain,
        "pretrain": ev.state.pretrain if ev.state else None,
        "method": method_name(cfg.aspkd),
        "wall_time_s": dict(times),
        "mlflow_run_id": run_id,
        "mlflow_uri": mlflow.get_tracking_uri(),
        "output_dir": root,
    }


def method_name(a: ASPKDConfig) -> str:
    """The method as the paper's ablation names it (Table 3), or the strategy's name."""
    if a.baseline == "prompt_only":
        return "prompt_only"
    paper = {("paper", True): "aspkd", ("random", False): "vanilla",
             ("paper", False): "active", ("random", True): "self_paced"}
    return paper.get((a.selection, a.self_paced),
                     a.selection + ("+self_paced" if a.self_paced else ""))


def publish(summary: dict, ev, class_names, num_classes: int, lay) -> None:
    """summary.json and agreement.png under the storage root, and everything in MLflow
    (per-round metrics, the plot, the summary, the student as an MLflow model)."""
    import mlflow

    from aspkd_ray.evaluation.report import confusion, plot_attack

    for row in summary["rounds"]:
        mlflow.log_metrics({k: float(v) for k, v in row.items()
                            if isinstance(v, (int, float)) and k != "round"},
                           step=row["round"])
    mlflow.log_metric("agreement_final", summary["agreement"])
    mlflow.log_metric("pseudo_label_agreement", summary["pseudo_label_agreement"] or 0.0)
    conf = (confusion(ev.final_classes, ev.victim_test, num_classes)
            if ev.final_classes is not None else None)
    with tempfile.TemporaryDirectory(prefix="aspkd-report-") as tmp:
        plot_attack(summary, Path(tmp) / "agreement.png", conf, class_names)
        (Path(tmp) / "summary.json").write_text(json.dumps(summary, indent=2))
        for name, target in (("summary.json", lay.summary), ("agreement.png", lay.plot)):
            storage.write_bytes(*storage.resolve(target), (Path(tmp) / name).read_bytes())
            mlflow.log_artifact(str(Path(tmp) / name))
    if ev.student is not None:
        log_student(ev.student, ev.example)


def log_student(student: torch.nn.Module, example: torch.Tensor) -> None:
    """The stolen student as an MLflow model (with an input example for its signature)."""
    import mlflow.pytorch

    try:
        mlflow.pytorch.log_model(student, name="student",
                                 input_example=example.numpy().astype(np.float32))
    except Exception as exc:  # logging the model must not lose the attack's results
        log.warning("could not log the student as an MLflow model: %s", exc)
