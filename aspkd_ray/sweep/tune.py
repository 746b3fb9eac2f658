"""Ray Tune sweeps over ASPKD settings (σ, k, rounds, learning rates, ...); the sweep file is
described in `sweep/spec.py`.

Each trial is one ASPKD attack (`sweep/trial.py`), its own Ray Train run, reporting every
round to Tune. All trials share one proxy set and one teacher service, which this driver
creates and holds until the last trial ends: a label bought by one trial is free for the
others, each trial is capped at its own budget n, and the service caps the sweep. Run again
with the same output folder, an interrupted sweep resumes (`Tuner.restore`): finished trials
are not rerun and the labels they bought stay free.

    stages: prepare (config, Ray, victim, proxy set, resources) → state (new or resumed)
            → teacher service (held) → shared validation labels (attacker objective)
            → Tune → evaluation of every trial (driver, oracle) → results and MLflow
"""

from __future__ import annotations

import functools
import json
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aspkd_ray import console, storage
from aspkd_ray.config import Config, from_dict, num_rounds, total_budget
from aspkd_ray.errors import UserError
from aspkd_ray.layout import join, run_layout
from aspkd_ray.runtime.reaper import PlacementGroupReaper
from aspkd_ray.sweep.search import ROUND
from aspkd_ray.sweep.spec import SweepSpec, load_sweep
from aspkd_ray.sweep.trial import SweepContext, run_trial, trial_config

log = logging.getLogger(__name__)

__all__ = ["load_sweep", "run_sweep", "trial_resources"]

VALIDATION_CLIENT = "sweep-validation"  # the ledger's name for the shared validation labels
TRIAL_CPUS = 0.01  # the trial function only waits on its Train run, which asks for its own


@dataclass
class Prepared:
    base: Config
    lay: object                  # RunLayout of the sweep's root
    proxy: object                # OpenPool of the shared proxy set
    num_classes: int
    n: int                       # calls per trial
    concurrent: int
    sizing: list[str]            # overrides sizing each trial's Ray Train workers


def run_sweep(spec: SweepSpec, output_dir: str | Path) -> list[dict]:
    """Run (or resume) the sweep; returns one row per trial, best first."""
    from aspkd_ray.tracking import mlflow_run

    p = _prepare(spec, output_dir)
    state = _state(spec, p.lay.root)
    val_calls = p.num_classes * spec.val_per_class if spec.objective == "attacker" else 0
    service_budget = spec.global_budget or p.n * spec.num_trials() + val_calls
    if service_budget < val_calls + 1:
        raise UserError(f"sweep.global_budget: {service_budget} calls, but the shared "
                        f"validation labels alone take {val_calls} (sweep.val_per_class="
                        f"{spec.val_per_class} x {p.num_classes} classes); raise it.")
    ctx = SweepContext(spec=spec, root=p.lay.root, proxy_dir=p.lay.proxy.rsplit("/", 1)[0],
                       ledger=p.lay.ledger, service_budget=service_budget,
                       pins=_pins(p, spec))
    teacher = _hold_teacher(p, ctx, val_calls)
    try:
        if val_calls:
            ctx.validation = _buy_validation(p, teacher, spec)
        with mlflow_run(p.base, f"sweep-{p.base.dataset.name}", run_id=state.get("parent"),
                        tags={"stage": "sweep", "aspkd.objective": spec.objective}) as parent:
            if state.get("parent") is None:
                state["parent"] = parent.info.run_id
                _write(join(p.lay.root, "sweep.json"), state)
            log.info("sweep: %d trial(s), %d at a time, service budget %d (n = %d per "
                     "trial, %d for validation labels)", spec.num_trials(), p.concurrent,
                     service_budget, p.n, val_calls)
            tracker = _tracker(ctx, parent, p.base)
            with PlacementGroupReaper():  # Ray Train groups of the trials Tune stops
                results = _tuner(spec, ctx, p, tracker).fit()
            rows = _evaluate(spec, ctx, p, results, tracker, teacher)
            unfinished = sum(r["status"] == "unfinished" for r in rows)
            if unfinished or len(rows) < spec.num_trials():
                log.warning("the sweep was interrupted: %d of %d trial(s) unfinished; run the "
                            "same command again to resume it", spec.num_trials() -
                            len(rows) + unfinished, spec.num_trials())
            _publish(spec, p, rows, {**teacher.status(), "validation": val_calls})
    finally:
        teacher.shutdown()  # the ledger keeps every label; a rerun starts a new service
    return rows


def _prepare(spec: SweepSpec, output_dir: str | Path) -> Prepared:
    """Config, Ray, the victim and the shared proxy set, made once before any trial."""
    from aspkd_ray.jobs.steal import ensure_proxy, ensure_victim
    from aspkd_ray.layout import input_shape
    from aspkd_ray.pool import open_pool
    from aspkd_ray.runtime import connect

    base = from_dict(spec.base, spec.overrides + [f"output_dir={json.dumps(str(output_dir))}"])
    lay = run_layout(base)
    if not storage.is_uri(lay.root):
        Path(lay.root).mkdir(parents=True, exist_ok=True)
    connect(base.ray.address, base.ray.namespace)
    ensure_victim(base)
    proxy = open_pool(base, ensure_proxy(base), *input_shape(base))
    num_classes = len(proxy.class_names)
    concurrent, sizing = trial_resources(base, spec)
    return Prepared(base, lay, proxy, num_classes, total_budget(base, num_classes), concurrent,
                    sizing)


def trial_resources(base: Config, spec: SweepSpec, nodes: list[dict] | None = None
                    ) -> tuple[int, list[str]]:
    """(trials at a time, overrides sizing each trial's Ray Train workers) so that the
    concurrent trials' workers fit the nodes side by side; checked before Tune starts (a
    request no node can hold would wait forever)."""
    from aspkd_ray.runtime.resources import (
        alive_nodes,
        check_placeable,
        largest_fitting_cpus,
        plan_workers,
    )

    nodes = alive_nodes() if nodes is None else nodes
    cpus = sum(n.get("CPU", 0.0) for n in nodes)
    gpus = sum(n.get("GPU", 0.0) for n in nodes)
    workers = base.ray.num_workers or 1
    use_gpu = gpus >= 1 and base.ray.use_gpu is not False
    if use_gpu:
        concurrent = spec.max_concurrent_trials or max(1, int(gpus // workers))
    else:
        concurrent = spec.max_concurrent_trials or max(1, int(cpus // 2))
    concurrent = max(1, min(concurrent, spec.num_trials()))
    sets = [f"ray.num_workers={workers}"]
    per = base.ray.cpus_per_worker
    if per is None:
        # The concurrent trials' workers share what is left after the drivers, the trial
        # functions and Ray Data's reads (the teacher service asks for no CPU on the head).
        share = (cpus - 0.5 - TRIAL_CPUS * concurrent) / (concurrent * workers)
        if use_gpu:
            share = min(share, 4.0)
        per = largest_fitting_cpus(max(round(share, 2), 0.1), nodes, concurrent * workers)
        sets.append(f"ray.cpus_per_worker={per}")
    plan = plan_workers(requested=workers, use_gpu=use_gpu if base.ray.use_gpu is None
                        else base.ray.use_gpu, cpus_per_worker=per, nodes=nodes,
                        autoscale=base.ray.autoscale)
    check_placeable(plan, nodes, autoscale=base.ray.autoscale, what="each sweep trial")
    return concurrent, sets


def _pins(p: Prepared, spec: SweepSpec) -> list[str]:
    """What every trial must share with the driver: the paths it resolved (trials run in
    other working folders), the per-trial cap n, the shared service's name, the workers'
    size."""
    b = p.base
    pins = [f"cache_dir={json.dumps(b.cache_dir)}"]
    for key, value in (("dataset.root", b.dataset.root),
                       ("victim.checkpoint", b.victim.checkpoint),
                       ("student.init_checkpoint", b.student.init_checkpoint),
                       ("generator.model", b.generator.model)):
        if value is not None:
            pins.append(f"{key}={json.dumps(value)}")
    return pins + p.sizing + [f"budget.per_trial={p.n}",
                            f"ray.teacher_service={json.dumps(_service_name(b))}"]


def _service_name(base: Config) -> str:
    return f"{base.ray.teacher_service}-sweep"


def _state(spec: SweepSpec, root: str) -> dict:
    """sweep.json: the spec this folder's sweep runs (and its MLflow parent run). Another
    sweep file pointed at the same folder is refused: its trials and labels would mix."""
    location = join(root, "sweep.json")
    fs, path = storage.resolve(location)
    mine = json.loads(json.dumps(spec.to_dict(), default=str))
    if storage.exists(fs, path):
        state = json.loads(storage.read_bytes(fs, path))
        if state.get("spec") != mine:
            diff = sorted(k for k in set(mine) | set(state.get("spec") or {})
                          if (state.get("spec") or {}).get(k) != mine.get(k))
            raise UserError(f"{root} holds another sweep (its sweep.json differs in "
                            f"{', '.join(diff)}); resume it with the same sweep file and "
                            f"--set values, or use another --output-dir.")
        log.info("resuming the sweep in %s", root)
        return state
    state = {"spec": mine, "parent": None}
    _write(location, state)
    return state


def _hold_teacher(p: Prepared, ctx: SweepContext, val_calls: int):
    """The shared teacher service, created here and held by this driver until the sweep
    ends (an actor lives while its creator holds a handle); its client buys the shared
    validation labels under the name VALIDATION_CLIENT, capped at what they need."""
    from aspkd_ray.teacher import connect_teacher_service

    cfg = from_dict(ctx.spec.base, ctx.spec.overrides + ctx.pins + [
        f"output_dir={json.dumps(p.base.output_dir)}", f"budget.ledger={json.dumps(ctx.ledger)}",
        f"budget.per_trial={max(val_calls, 1)}"])
    return connect_teacher_service(cfg, p.num_classes, budget=ctx.service_budget,
                                   ledger_uri=ctx.ledger, trial=VALIDATION_CLIENT)


def _buy_validation(p: Prepared, teacher, spec: SweepSpec):
    """The attacker objective's labels: val_per_class proxy validation images of each
    generation class, picked from the sweep's seed, bought once (free when resumed)."""
    from aspkd_ray.aspkd.rounds import pick_bought_val
    from aspkd_ray.train.attack import SharedValidation

    seed = p.base.seed if spec.seed is None else spec.seed
    rows = p.proxy.val[pick_bought_val(p.proxy.classes[p.proxy.val], spec.val_per_class,
                                       seed)]
    images = p.proxy.read(rows)
    labels = teacher.buy([str(i) for i in p.proxy.ids[rows]], p.proxy.classes[rows], images)
    return SharedValidation(images=images,
                            labels=labels if labels.ndim == 1 else labels.argmax(1))


def _tracker(ctx: SweepContext, parent, base: Config):
    from aspkd_ray.sweep.tracking import SweepTracker

    return SweepTracker(parent.info.run_id, parent.info.experiment_id, ctx.spec.objective,
                        functools.partial(trial_config, ctx),
                        (_service_name(base), base.ray.namespace))


def _tuner(spec: SweepSpec, ctx: SweepContext, p: Prepared, tracker):
    """A new Tuner, or the interrupted one restored (its finished trials kept)."""
    from ray import tune

    from aspkd_ray.sweep.search import SCHEDULERS, SEARCHES, search_space

    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx),
                                    {"CPU": TRIAL_CPUS})
    fs, path = storage.resolve(p.lay.tune)
    fs = None if storage.is_local(fs) else fs
    experiment = f"{path.rstrip('/')}/sweep"
    if tune.Tuner.can_restore(experiment, storage_filesystem=fs):
        # Unfinished and failed trials run again (a rerun trial resumes from its last round
        # checkpoint; its labels are free); finished ones are kept as they are.
        return tune.Tuner.restore(experiment, trainable, resume_unfinished=True,
                                  resume_errored=True, storage_filesystem=fs)
    seed = p.base.seed if spec.seed is None else spec.seed
    return tune.Tuner(
        trainable, param_space=search_space(spec.space),
        tune_config=tune.TuneConfig(metric=spec.metric, mode="max",
                                    num_samples=spec.num_samples,
                                    search_alg=SEARCHES.get(spec.search)(spec, seed,
                                                                         p.concurrent),
                                    scheduler=SCHEDULERS.get(spec.scheduler)(spec)),
        run_config=tune.RunConfig(name="sweep", storage_path=path, storage_filesystem=fs,
                                  callbacks=[tracker],
                                  # Tune's trial tables print from the driver: -v only
                                  verbose=None if console.verbose() else 0))


# Tune's trial ids: "<5 hex>_<5 digits>" (basic search) or 8 hex digits (searchers).
_TRIAL_ID = re.compile(r"_([0-9a-f]{5}_\d{5}|[0-9a-f]{8})(?:_|$)")


def _trial_id(result) -> str | None:
    tid = (result.metrics or {}).get("trial_id")
    if tid:
        return tid
    found = _TRIAL_ID.search(Path(str(result.path)).name)
    return found.group(1) if found else None


def _evaluate(spec: SweepSpec, ctx: SweepContext, p: Prepared, results, tracker,
              teacher) -> list[dict]:
    """Every trial's row: its parameters, last reported objective, and the test agreement of
    each of its rounds, measured here by the experimenter's oracle (never in a trial with
    the attacker objective); its MLflow child run is then completed."""
    from aspkd_ray.evaluation.rounds import evaluate_rounds
    from aspkd_ray.sweep.results import rank_rows
    from aspkd_ray.sweep.tracking import finish_child
    from aspkd_ray.train.attack import stored_rounds

    spent = teacher.status()["trial_spent"]
    rows = []
    for result in results:
        tid = _trial_id(result)
        params = {k: v for k, v in (result.config or {}).items() if k in spec.space}
        if tid is None:
            rows.append({**params, "status": "error", "error": str(result.error)})
            continue
        cfg = trial_config(ctx, params, tid)
        metrics = result.metrics or {}
        # The rounds Tune received: a trial its scheduler stopped may finish one more round
        # before its process is killed, which counts for nothing.
        done = int(metrics.get(ROUND) or 0)
        rounds = [r for r in stored_rounds(run_layout(cfg).train) if r[1][ROUND] <= done]
        ev = evaluate_rounds(cfg, rounds, p.proxy, p.num_classes) if rounds else None
        planned = num_rounds(cfg, p.num_classes)
        run_id = tracker.child(tid, params)
        status = ("error" if result.error else "unfinished" if not tracker.ended(run_id)
                  else "stopped early" if done < planned else "done")
        row = {"trial": tid, **params,
               "val_agreement": metrics.get("val_agreement"),
               "agreement": ev.rounds[-1]["agreement"] if ev else None,
               "agreement_by_round": [r["agreement"] for r in ev.rounds] if ev else [],
               "pseudo_label_agreement": (ev.pseudo_label_agreement[-1]
                                          if ev and ev.pseudo_label_agreement else None),
               "calls_used": int(spent.get(tid, 0)), "rounds_done": done,
               "rounds_planned": planned, "status": status,
               "stopped_early": status == "stopped early",
               "teacher_actor": metrics.get("teacher_actor"),
               "error": str(result.error) if result.error else None}
        row["mlflow_run_id"] = run_id
        if status != "unfinished":  # an interrupted trial's run goes on when resumed
            finish_child(run_id, row, ev, {"error": "FAILED", "stopped early": "KILLED"}
                         .get(status, "FINISHED"))
        rows.append(row)
    return rank_rows(rows, spec.metric)


def _publish(spec: SweepSpec, p: Prepared, rows: list[dict], spent: dict) -> None:
    """sweep_results.{json,md}, sweep.png and best.yaml under the sweep's root, and in the
    MLflow parent run (with the best trial's objective and test agreement)."""
    import mlflow

    from aspkd_ray.sweep.results import (
        best_config_yaml,
        plot_parameters,
        results_markdown,
    )

    keys = list(spec.space)
    files = {"sweep_results.json": json.dumps(rows, indent=2, default=str),
             "sweep_results.md": results_markdown(rows, keys, spec.objective, spec.metric,
                                                  spent)}
    best = next((r for r in rows if isinstance(r.get(spec.metric), (int, float))), None)
    if best is not None:
        files["best.yaml"] = best_config_yaml(
            spec.base, spec.overrides, {k: best[k] for k in keys},
            f"best trial {best['trial']} of the sweep by {spec.metric} "
            f"(objective: {spec.objective}): {best[spec.metric]:.2f}; "
            f"aspkd steal --config best.yaml")
        mlflow.log_metrics({f"best_{spec.metric}": float(best[spec.metric]),
                            "best_test_agreement": float(best.get("agreement") or np.nan)})
        mlflow.set_tag("aspkd.best_trial", best["trial"])
    mlflow.log_metrics({"spent": float(spent.get("spent", 0)),
                        "validation_calls": float(spent.get("validation", 0))})
    with tempfile.TemporaryDirectory(prefix="aspkd-sweep-") as tmp:
        for name, text in files.items():
            (Path(tmp) / name).write_text(text)
        plot_parameters(rows, spec.space, spec.metric, Path(tmp) / "sweep.png")
        for name in [*files, "sweep.png"]:
            storage.write_bytes(*storage.resolve(join(p.lay.root, name)),
                                (Path(tmp) / name).read_bytes())
            mlflow.log_artifact(str(Path(tmp) / name))


def _write(location: str, data: object) -> None:
    storage.write_bytes(*storage.resolve(location),
                        json.dumps(data, indent=2, default=str).encode())
