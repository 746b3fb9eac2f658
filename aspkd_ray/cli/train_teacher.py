"""`aspkd train-teacher`: train the victim on its real data (the experimenter's side)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from aspkd_ray import console
from aspkd_ray.cli.main import add_common, load_config


def register(sub) -> None:
    p = sub.add_parser("train-teacher", help="train the victim model and save its checkpoint",
                       description="Train the victim (teacher) with the paper's per-data-set "
                                   "settings; report test accuracy; save the checkpoint and "
                                   "summary.json to the output dir; log to MLflow.")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import mlflow

    from aspkd_ray.tracking import mlflow_run
    from aspkd_ray.victim import train_victim

    cfg = load_config(args)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with mlflow_run(cfg, "train-teacher", tags={"stage": "train-teacher"}) as run, \
            console.stage("victim") as st:
        st.start(f"training the {cfg.dataset.name} victim ({cfg.victim.architecture})")
        summary = train_victim(cfg)
        st.detail = f"trained, {summary['test_accuracy']:.2f}% test accuracy"
        mlflow.log_metric("test_accuracy", summary["test_accuracy"])
        mlflow.log_metric("wall_time_s", summary["wall_time_s"])
        summary["mlflow_run_id"] = run.info.run_id
    ckpt = Path(summary["checkpoint"])
    if ckpt.resolve() != (out / "victim").resolve():
        shutil.copytree(ckpt, out / "victim", dirs_exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"victim test accuracy {summary['test_accuracy']:.2f}% in {summary['wall_time_s']}s; "
          f"checkpoint {out / 'victim'} (cached at {ckpt}); MLflow run "
          f"{summary['mlflow_run_id']}")
    return 0
