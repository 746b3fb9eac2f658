"""`aspkd steal`: one ASPKD attack end to end, and its evaluation.

Stages: proxy set (generate or reuse) → teacher service → rounds on Ray Train → evaluation by
the oracle (after the attack, never visible to it) → summary.json, plots and MLflow.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from aspkd_ray.aspkd.rounds import ProxyPool, RoundSettings
from aspkd_ray.config import Config, num_rounds, to_dict, total_budget
from aspkd_ray.datasets import get_spec, load_victim_data, to_tensor
from aspkd_ray.victim.train import input_shape, victim_checkpoint_dir

log = logging.getLogger(__name__)

EMBEDDED = ("digits", "digits-xdomain")


def ensure_victim(cfg: Config) -> Path:
    """The victim's checkpoint; the embedded scenarios train (and cache) theirs."""
    from aspkd_ray.victim import train_victim

    if cfg.victim.endpoint:
        return Path("-")
    folder = victim_checkpoint_dir(cfg)
    if not (folder / "model.safetensors").exists():
        if cfg.dataset.name not in EMBEDDED:
            raise FileNotFoundError(f"victim.checkpoint {folder} not found; train one with "
                                    f"`aspkd train-teacher` or point victim.checkpoint at it.")
        log.info("training the %s victim (cached at %s)", cfg.dataset.name, folder)
        train_victim(cfg)
    return folder


def ensure_proxy(cfg: Config, out: Path) -> Path:
    """<proxy.dir or out>/proxy: generated (or resumed) unless a complete one is there."""
    from aspkd_ray.generation import ensure_generator, generate_proxy

    out = Path(cfg.proxy.dir) if cfg.proxy.dir else out
    proxy = out / "proxy"
    if not (proxy / "_manifest.json").exists():
        if cfg.generator.kind == "ddpm":
            ensure_generator(cfg)
        generate_proxy(cfg, out)
    return proxy


def round_settings(cfg: Config, num_classes: int, budget: int, flip: bool) -> RoundSettings:
    a = cfg.aspkd
    return RoundSettings(
        num_classes=num_classes, budget=budget, rounds=num_rounds(cfg, num_classes),
        output=cfg.victim.output, training=cfg.training, active=a.active,
        self_paced=a.self_paced, sigma=a.sigma, sigma_mode=a.sigma_mode, k=a.k,
        distance=a.distance, generation_class_filter=a.generation_class_filter,
        centroids=a.centroids, flip=flip, seed=cfg.seed,
        prompt_only=a.baseline == "prompt_only",
        pretrain=cfg.student.pretrain == "proxy_prompts",
        prior_correction=a.prior_correction)


def _pick_bought_val(classes: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 7])
    picks = [rng.permutation(np.flatnonzero(classes == c))[:per_class]
             for c in np.unique(classes)]
    return np.sort(np.concatenate(picks))


def run_steal(cfg: Config, *, trial: str | None = None,
              service_budget: int | None = None) -> dict:
    """Run one attack as configured; write summary.json, plots and MLflow; return the summary.

    In a sweep, `trial` names the Tune trial (capped by budget.per_trial) and
    `service_budget` is the teacher service's global cap shared by all trials; a standalone
    run owns its service and stops it at the end (its ledger stays).
    """
    import mlflow

    from aspkd_ray.evaluation.oracle import EvaluationOracle
    from aspkd_ray.evaluation.report import agreement, confusion, plot_attack
    from aspkd_ray.generation import load_proxy_set
    from aspkd_ray.runtime import connect
    from aspkd_ray.teacher import connect_teacher_service
    from aspkd_ray.tracking import mlflow_run
    from aspkd_ray.train.attack import AttackJob, load_round_checkpoint, run_attack

    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    spec = get_spec(cfg.dataset.name)
    size, chans = input_shape(cfg)
    times: dict[str, float] = {}
    t_all = time.time()
    connect(cfg.ray.address, cfg.ray.namespace)

    t = time.time()
    ensure_victim(cfg)
    times["victim"] = time.time() - t
    t = time.time()
    proxy = load_proxy_set(ensure_proxy(cfg, out))
    times["proxy"] = time.time() - t
    num_classes = len(proxy.class_names) or spec.num_classes
    n = total_budget(cfg, num_classes)

    train_mask = proxy.split == "train"
    tr, va = np.flatnonzero(train_mask), np.flatnonzero(~train_mask)
    x_all = to_tensor(proxy.images, size, chans)
    pool = ProxyPool(x=x_all[torch.as_tensor(tr)], classes=proxy.classes[tr],
                     x_val=x_all[torch.as_tensor(va)], classes_val=proxy.classes[va])
    ledger = cfg.budget.ledger or str(out / "ledger")
    prompt_only = cfg.aspkd.baseline == "prompt_only"

    with mlflow_run(cfg, f"steal-{cfg.dataset.name}", tags={"stage": "steal"}) as run:
        mlflow.log_dict(to_dict(cfg), "config.json")
        t = time.time()
        val_labels = None
        pool_budget = 0 if prompt_only else n
        if not prompt_only:
            teacher = connect_teacher_service(cfg, num_classes, budget=service_budget or n,
                                              ledger_uri=ledger, trial=trial)
            if cfg.training.early_stopping == "bought_val":
                # A teacher-labelled validation subset is paid for like any other label.
                vb = _pick_bought_val(pool.classes_val, cfg.training.bought_val_per_class,
                                      cfg.seed)
                answers = teacher.buy([proxy.ids[va[i]] for i in vb], pool.classes_val[vb],
                                      proxy.images[va[vb]])
                keep = torch.as_tensor(vb)
                pool.x_val, pool.classes_val = pool.x_val[keep], pool.classes_val[vb]
                val_labels = answers if answers.ndim == 1 else answers.argmax(1)
                pool_budget = n - len(vb)
        settings = round_settings(cfg, num_classes, pool_budget, spec.horizontal_flip)
        job = AttackJob(cfg=cfg, settings=settings, pool_ref=_put(pool),
                        ids=[str(i) for i in proxy.ids[tr]],
                        images_ref=_put(proxy.images[tr]), num_classes=num_classes,
                        budget_total=service_budget or n, ledger_uri=ledger,
                        val_labels=val_labels, trial=trial)
        rounds = run_attack(job, out / "ray_train")
        times["attack"] = time.time() - t

        # Evaluation: the experimenter's oracle, only now, and never handed to the attack.
        t = time.time()
        oracle = EvaluationOracle(cfg)
        test = load_victim_data(cfg.dataset.name, "test", cfg.dataset.root,
                                cfg.dataset.download, size)
        x_test = to_tensor(test.images, size, chans)
        victim_test = oracle.predict_classes(test.images)
        victim_pool = oracle.predict_classes(proxy.images[tr])
        student = _student_like(cfg, num_classes, chans, size)
        by_round, pseudo_agree, final_classes, state = [], [], None, None
        for folder, metrics in rounds:
            state, weights = load_round_checkpoint(folder)
            student.load_state_dict(weights)
            with torch.no_grad():
                final_classes = _predict(student, x_test)
            row = {"round": state.round - 1, "agreement": agreement(final_classes, victim_test),
                   "calls_used": int(len(state.bought_idx)) + (0 if val_labels is None
                                                               else len(val_labels)),
                   **{k: v for k, v in metrics.items() if k not in ("round", "round_done")}}
            by_round.append(row)
            mlflow.log_metrics({"agreement": row["agreement"],
                                "calls_used": row["calls_used"],
                                **{k: float(v) for k, v in metrics.items()
                                   if isinstance(v, (int, float))}}, step=row["round"])
        for p in (state.pseudo if state else []):
            pseudo_agree.append(agreement(p["classes"], victim_pool[p["idx"]])
                                if len(p["idx"]) else float("nan"))
        times["evaluation"] = time.time() - t

        calls_used = 0
        if not prompt_only:
            status = teacher.status()
            calls_used = (status["trial_spent"].get(trial, 0) if trial is not None
                          else status["spent"])
            if trial is None:
                teacher.shutdown()  # frees the name; the ledger keeps what was bought
        final = by_round[-1]["agreement"] if by_round else float("nan")
        filter_rates = [r.get("filter_rate") for r in by_round if "filter_rate" in r]
        summary = {
            "dataset": cfg.dataset.name,
            "agreement": final,
            "agreement_by_round": [r["agreement"] for r in by_round],
            "calls_used": int(calls_used),
            "budget": n,
            "calls_per_class": n / num_classes,
            "rounds": by_round,
            "pseudo_label_filter_rate": filter_rates[-1] if filter_rates else None,
            "pseudo_label_filter_rate_by_round": filter_rates,
            "pseudo_label_agreement": pseudo_agree[-1] if pseudo_agree else None,
            "pseudo_label_agreement_by_round": pseudo_agree,
            "victim_output": cfg.victim.output,
            "student_pretrain": cfg.student.pretrain,
            "pretrain": state.pretrain if state else None,
            "method": ("prompt_only" if prompt_only else
                       {(True, True): "aspkd", (False, False): "vanilla",
                        (True, False): "active", (False, True): "self_paced"}[
                           (cfg.aspkd.active, cfg.aspkd.self_paced)]),
            "wall_time_s": {k: round(v, 1) for k, v in times.items()},
            "mlflow_run_id": run.info.run_id,
            "mlflow_uri": mlflow.get_tracking_uri(),
            "output_dir": str(out),
        }
        summary["wall_time_s"]["total"] = round(time.time() - t_all, 1)
        plot = plot_attack(summary, out / "agreement.png",
                           confusion(final_classes, victim_test, num_classes)
                           if final_classes is not None else None, proxy.class_names)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        mlflow.log_metric("agreement_final", final)
        mlflow.log_metric("pseudo_label_agreement", summary["pseudo_label_agreement"] or 0.0)
        mlflow.log_artifact(str(out / "summary.json"))
        mlflow.log_artifact(str(plot))
        _log_student(student, x_test[:4])
    return summary


def _put(obj):
    import ray

    return ray.put(obj)


def _student_like(cfg: Config, num_classes: int, chans: int, size: int) -> torch.nn.Module:
    from aspkd_ray.models import create_model

    return create_model(cfg.student.architecture, num_classes=num_classes, in_chans=chans,
                        image_size=size).eval()


def _predict(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    from aspkd_ray.aspkd.distill import predict_logits

    return predict_logits(model, x).argmax(1).numpy()


def _log_student(student: torch.nn.Module, example: torch.Tensor) -> None:
    """The stolen student as an MLflow model (with an input example for its signature)."""
    import mlflow.pytorch

    try:
        mlflow.pytorch.log_model(student, name="student",
                                 input_example=example.numpy().astype(np.float32))
    except Exception as exc:  # logging the model must not lose the attack's results
        log.warning("could not log the student as an MLflow model: %s", exc)
