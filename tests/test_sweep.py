"""A tiny Ray Tune sweep, interrupted and resumed: four trials share one proxy set (under a
proxy.dir of the base config) and one teacher service held by the driver, report every
round to an ASHA scheduler that must stop the clearly bad arm, optimise the attacker
objective without any trial reaching the evaluation oracle, and log one MLflow child run per
trial under one parent."""

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import start_test_ray
from test_steal import PLUGIN


def _no_oracle_in_workers():
    """Ray's worker setup hook for this test: in every Ray worker (trials, Train controllers
    and workers, the teacher service) the evaluation oracle and the real test split fail.
    The driver, which is the test process, keeps them."""
    import aspkd_ray.datasets as datasets
    from aspkd_ray.evaluation import oracle

    def unreachable(*args, **kwargs):
        raise RuntimeError("the evaluation oracle is unreachable from Ray workers here")

    oracle.EvaluationOracle.__init__ = unreachable
    load = datasets.load_victim_data

    def no_test_split(name, split, *args, **kwargs):
        if split == "test":
            unreachable()
        return load(name, split, *args, **kwargs)

    datasets.load_victim_data = no_test_split


@pytest.fixture
def ray_without_oracle(ray_session):
    import ray
    import ray.cloudpickle

    # Workers cannot import this test module: the hook travels by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.shutdown()
    start_test_ray(runtime_env={"worker_process_setup_hook": _no_oracle_in_workers})
    yield
    ray.shutdown()
    start_test_ray()


def _interrupt_when(condition, timeout_s: float = 600) -> threading.Thread:
    """SIGINT to this process (Tune's Ctrl+C: it saves its state and ends) once true."""
    main = threading.main_thread().ident

    def watch():
        end = time.time() + timeout_s
        while time.time() < end:
            if condition():
                signal.pthread_kill(main, signal.SIGINT)
                return
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _checkpoints(out: Path) -> dict:
    return {str(p.relative_to(out)): p.stat().st_mtime
            for p in out.glob("trials/*/ray_train/attack/checkpoint_*/*")}


@pytest.mark.timeout(1200)
def test_sweep_interrupted_resumed_asha_attacker_objective(ray_without_oracle, tmp_path):
    import mlflow

    from aspkd_ray.sweep.tune import load_sweep, run_sweep
    from aspkd_ray.teacher import Ledger

    plugin = tmp_path / "digits_plugin.py"
    plugin.write_text(PLUGIN)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({
        "cache_dir": str(tmp_path / "cache"),
        "generator": {"kind": "plugin", "plugin": f"{plugin}:make", "batch_size": 50},
        "proxy": {"per_class": 20, "dir": str(tmp_path / "shared")},
        "budget": {"calls_per_class": 2},   # 2 rounds of 10 calls
        "victim": {"training": {"max_epochs": 1}},
        "student": {"pretrain": "proxy_prompts"},  # good arms start from the prompts' classes
        "training": {"max_epochs": 3, "patience": 1},
    }))
    # The last arm cannot learn (lr 1e-9), not even from the prompts: ASHA must stop it after
    # its first round, once any other arm reported that round.
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({
        "base": "base.yaml",
        "sweep": {"space": {"training.lr": {"grid": [3e-3, 4e-3, 2e-3, 1e-9]}},
                  "scheduler": "asha", "val_per_class": 3, "max_concurrent_trials": 1},
    }))
    spec = load_sweep(tmp_path / "sweep.yaml")
    out = tmp_path / "out"

    # First run: interrupted (Ctrl+C) as soon as the second trial has started.
    _interrupt_when(lambda: len(list(out.glob("trials/*"))) >= 2)
    first = run_sweep(spec, out)
    done_first = {r["trial"]: r for r in first if r["status"] == "done"}
    assert len(done_first) >= 1 and any(r["status"] == "unfinished" for r in first)
    kept = _checkpoints(out)
    finished_files = {k: v for k, v in kept.items()
                      if k.split("/")[1] in done_first}
    assert finished_files

    # Run again with the same folder: resumed, the finished trial is not rerun.
    rows = run_sweep(load_sweep(tmp_path / "sweep.yaml"), out)
    after = _checkpoints(out)
    assert {k: after.get(k) for k in finished_files} == finished_files
    assert len(rows) == 4 and all(r["status"] in ("done", "stopped early") for r in rows)
    by_lr = {r["training.lr"]: r for r in rows}
    bad = by_lr[1e-9]
    assert bad["stopped_early"] and bad["rounds_done"] == 1 < bad["rounds_planned"] == 2
    # attacker objective from every trial, test agreement measured by the driver
    assert all(isinstance(r["val_agreement"], float) and isinstance(r["agreement"], float)
               for r in rows)
    assert [r["val_agreement"] for r in rows] == sorted((r["val_agreement"] for r in rows),
                                                        reverse=True)
    # one teacher service for every trial: the driver's, never re-created
    resumed = [r["teacher_actor"] for r in rows if r["trial"] not in done_first]
    assert len(resumed) >= 3 and len(set(resumed)) == 1 and resumed[0]
    # the global spend within the sweep's cap; the validation labels bought once
    status = Ledger(str(out / "ledger"), create=False).status()
    cap = 4 * 20 + 30
    assert status["budget"] == cap and status["spent"] <= cap
    assert status["trial_spent"]["sweep-validation"] == 30
    assert all(status["trial_spent"][r["trial"]] == r["calls_used"] <= 20 for r in rows)
    # the proxy set where the base config put it, not under the output folder
    assert (tmp_path / "shared" / "proxy" / "_manifest.json").exists()
    assert not (out / "proxy").exists()
    # MLflow: one parent, one child per trial (per-round metrics, test agreement, student)
    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["aspkd"], output_format="list")
    parents = [r for r in runs if r.data.tags.get("stage") == "sweep"]
    children = [r for r in runs if r.data.tags.get("stage") == "sweep-trial"]
    assert len(parents) == 1 and len(children) == 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert {c.data.tags["aspkd.trial"] for c in children} == {r["trial"] for r in rows}
    client = mlflow.MlflowClient()
    for c in children:
        assert c.data.params["training.lr"] in {str(lr) for lr in by_lr}
        assert len(client.get_metric_history(c.info.run_id, "val_agreement")) >= 1
        assert len(client.get_metric_history(c.info.run_id, "test_agreement")) >= 1
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"sweep_results.md", "sweep.png", "best.yaml"} <= artifacts
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["training"]["lr"] == rows[0]["training.lr"]
    assert "objective: attacker" in (out / "sweep_results.md").read_text()
    saved = json.loads((out / "sweep_results.json").read_text())
    assert [r["trial"] for r in saved] == [r["trial"] for r in rows]
    assert os.environ.get("RAY_ADDRESS") is None
