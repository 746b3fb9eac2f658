"""The command line: help everywhere, config errors, `aspkd info` embedded and on a head."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aspkd_ray.cli.main import build_parser, main

BIN = Path(sys.executable).parent


# Every subcommand of `aspkd` and the test that checks one real behaviour of it; a new
# subcommand fails test_every_subcommand_has_help until it is added here with its check.
BEHAVIOUR = {
    "info": "test_info_prints_versions_resources_and_models",
    "train-teacher": "test_bad_override_is_reported_with_the_key",
    "train-generator": "test_train_generator_reuses_a_trained_generator",
    "generate": "test_generate_refuses_a_missing_plugin_before_anything_runs",
    "show-proxy": "test_show_proxy_without_a_proxy_set_says_to_generate_it",
    "serve-victim": "test_serve_victim_refuses_a_bad_port",
    "budget": "test_budget_prints_what_the_ledger_holds",
    "steal": "test_steal_refuses_a_budget_larger_than_the_pool",
    "demo": "test_demo_refuses_a_missing_victim_before_making_its_run_folder",
    "sweep": "test_sweep_refuses_an_empty_space",
    "audit": "test_audit_refuses_an_unknown_defence_before_anything_runs",
}


def _subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_every_subcommand_has_help(capsys):
    names = _subcommands()
    assert set(names) == set(BEHAVIOUR), "every subcommand needs a behaviour check here"
    assert all(callable(globals().get(test)) for test in BEHAVIOUR.values())
    # the installed command (console script), top-level help listing every subcommand
    top = subprocess.run([str(BIN / "aspkd"), "--help"], capture_output=True, text=True,
                         timeout=60)
    assert top.returncode == 0, top.stderr
    assert top.stdout.startswith("usage: aspkd")
    assert all(name in top.stdout for name in names)
    for name in names:
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: aspkd " + name) and "--help" in out


def _error_line(capsys, argv, code, prefix="aspkd: error: "):
    """Run `aspkd -q ARGV` in this process; it must exit with `code` and say one line on
    stderr starting with `prefix`, nothing on stdout. Returns that line."""
    rc = main(["-q", *argv])
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert rc == code, err
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    assert out == ""
    return lines[0]


def test_bad_override_is_reported_with_the_key(capsys, tmp_path):
    out = tmp_path / "out"
    line = _error_line(capsys, ["train-teacher", "--output-dir", str(out), "--set",
                                "victim.output=x"], 2, "aspkd: config error: ")
    assert "victim.output" in line and "'x'" in line and "soft" in line  # what is accepted
    assert not out.exists()


def test_info_prints_versions_resources_and_models(capsys, monkeypatch):
    import importlib.metadata as md

    import aspkd_ray.runtime

    asked = []
    fake = {"address": "10.0.0.1:6379", "namespace": "ns", "nodes": 2,
            "resources": {"CPU": 3.0, "GPU": 1.0}}
    monkeypatch.setattr(aspkd_ray.runtime, "connect", lambda address=None: asked.append(
        address) or fake)
    assert main(["-q", "info", "--address", "10.0.0.1:6379"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert asked == ["10.0.0.1:6379"]
    lines = {line.split(":", 1)[0]: line for line in out}
    for pkg in ("ray", "torch", "numpy"):
        assert f"{pkg} {md.version(pkg)}" in lines["versions"], pkg
    assert "10.0.0.1:6379" in lines["ray"] and "nodes=2" in lines["ray"]
    assert "CPU=3" in lines["resources"] and "GPU=1" in lines["resources"]
    assert "digits_cnn_small" in lines["students"] and "digits_cnn" in lines["teachers"]


def test_train_generator_reuses_a_trained_generator(capsys, tmp_path):
    gen = tmp_path / "gen"
    (gen / "unet").mkdir(parents=True)
    (gen / "model_index.json").write_text("{}")
    (gen / "aspkd_generator.json").write_text('{"complete": true, "final_loss": 0.5}')
    before = {p: p.stat().st_mtime_ns for p in gen.rglob("*")}
    rc = main(["-q", "train-generator", "--output-dir", str(tmp_path / "out"),
               "--set", f"generator.model={gen}"])
    assert rc == 0
    assert f"generator ready at {gen} (MLflow run " in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in gen.rglob("*")} == before  # not trained again


def test_train_generator_refuses_a_generator_it_cannot_train(capsys, tmp_path):
    plugin = tmp_path / "plugin.py"
    plugin.write_text("def make(config, class_names, device):\n    return None\n")
    out = tmp_path / "out"
    line = _error_line(capsys, ["train-generator", "--output-dir", str(out), "--set",
                                "generator.kind=plugin", "--set",
                                f"generator.plugin={plugin}:make"], 2,
                       "aspkd: config error: ")
    assert "generator.kind" in line and "ddpm" in line
    assert not out.exists()


def test_generate_refuses_a_missing_plugin_before_anything_runs(capsys, tmp_path):
    out = tmp_path / "out"
    line = _error_line(capsys, ["generate", "--output-dir", str(out), "--set",
                                "generator.kind=plugin", "--set",
                                f"generator.plugin={tmp_path / 'nope.py'}:make"], 2,
                       "aspkd: config error: ")
    assert "generator.plugin" in line and f"{tmp_path / 'nope.py'} is not a file" in line
    assert not out.exists()  # no proxy folder, no MLflow database


def test_show_proxy_without_a_proxy_set_says_to_generate_it(capsys, tmp_path):
    line = _error_line(capsys, ["show-proxy", "--output-dir", str(tmp_path)], 1)
    assert f"{tmp_path / 'proxy'}" in line and "aspkd generate" in line
    assert not (tmp_path / "proxy_grid.png").exists()


def test_show_proxy_refuses_a_non_positive_per_class(capsys, tmp_path):
    rc = main(["-q", "show-proxy", "--output-dir", str(tmp_path), "--per-class", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.splitlines()) == 1 and "--per-class" in err


def test_serve_victim_refuses_a_bad_port(capsys, tmp_path):
    line = _error_line(capsys, ["serve-victim", "--output-dir", str(tmp_path),
                                "--port", "70000"], 2, "aspkd: ")
    assert "--port" in line and "70000" in line and "1..65535" in line


@pytest.mark.parametrize("argv, code", [
    (["serve-victim", "--port", "70000"], 2),
    (["serve-victim", "--set", "victim.checkpoint=/nonexistent/victim"], 1),
    (["budget"], 1),
], ids=["serve-victim-port", "serve-victim-no-checkpoint", "budget-no-ledger"])
def test_serve_and_budget_errors_use_the_common_prefix(capsys, tmp_path, argv, code):
    _error_line(capsys, [*argv, "--output-dir", str(tmp_path)], code)


def test_budget_prints_what_the_ledger_holds(capsys, tmp_path):
    import numpy as np

    from aspkd_ray.teacher import Ledger

    uri = str(tmp_path / "ledger")
    ledger = Ledger(uri, budget=10, output="soft", num_classes=3, writer="test")
    ledger.reserve(["a", "b", "c"], [0, 2, 2], ["", "", ""], [True] * 3)
    ledger.record_answers(["a", "b"], np.full((2, 3), 1 / 3, np.float32))
    ledger.close()
    assert main(["-q", "budget", "--output-dir", str(tmp_path / "out"), "--ledger", uri,
                 "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["spent"], status["left"], status["budget"]) == (3, 7, 10)
    assert status["per_class"] == {"0": 1, "2": 2}
    assert status["reserved_unanswered"] == ["c"]
    assert main(["-q", "budget", "--output-dir", str(tmp_path / "out"), "--ledger",
                 uri]) == 0
    text = capsys.readouterr().out
    assert "spent:    3 of 10  (left 7)" in text and "0: 1, 2: 2" in text


def test_steal_refuses_a_budget_larger_than_the_pool(capsys, tmp_path):
    out = tmp_path / "out"
    line = _error_line(capsys, ["steal", "--output-dir", str(out), "--set",
                                "proxy.per_class=5", "--set", "budget.calls_per_class=9"], 2,
                       "aspkd: config error: ")
    # 10 classes x 5 images, 15% for validation: fewer images than the 90 calls
    assert "budget.calls_per_class=9" in line and "holds only" in line
    assert not out.exists()  # refused before Ray, generation or the teacher


def test_demo_refuses_a_missing_victim_before_making_its_run_folder(capsys, tmp_path):
    missing = tmp_path / "no-victim"
    line = _error_line(capsys, ["demo", "--set", f"output_dir={tmp_path / 'runs'}", "--set",
                                f"victim.checkpoint={missing}"], 2)
    assert f"victim.checkpoint: {missing} does not exist" in line
    assert "--train-victim" in line
    assert not (tmp_path / "runs").exists()  # no demo-<time> folder


def test_sweep_refuses_an_empty_space(capsys, tmp_path):
    (tmp_path / "base.yaml").write_text("seed: 1\n")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("base: base.yaml\nsweep:\n  space: {}\n")
    out = tmp_path / "out"
    line = _error_line(capsys, ["sweep", "--sweep", str(sweep), "--output-dir", str(out)],
                       2, "aspkd: config error: ")
    assert "sweep.space: empty" in line
    assert not out.exists()


def test_audit_refuses_an_unknown_defence_before_anything_runs(capsys, tmp_path):
    out = tmp_path / "out"
    line = _error_line(capsys, ["audit", "--output-dir", str(out), "--set",
                                "audit.defences=[{name: blur}]"], 2, "aspkd: config error: ")
    assert "audit.defences[0].name" in line and "'blur'" in line and "top1" in line
    assert not out.exists()


def test_sweep_prints_every_trial_best_first(capsys, tmp_path, monkeypatch):
    import aspkd_ray.sweep.tune as tune_module

    (tmp_path / "base.yaml").write_text("seed: 1\n")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("base: base.yaml\nsweep:\n  space: {aspkd.k: {grid: [3, 5, 7]}}\n")
    rows = [
        {"trial": "a", "aspkd.k": 5, "val_agreement": 61.0, "agreement": 60.5,
         "calls_used": 80, "rounds_done": 3, "rounds_planned": 3, "status": "done"},
        {"trial": "b", "aspkd.k": 3, "val_agreement": 20.0, "agreement": 19.0,
         "calls_used": 27, "rounds_done": 1, "rounds_planned": 3, "status": "stopped early",
         "stopped_early": True},
        {"trial": "c", "aspkd.k": 7, "status": "error", "error": "RuntimeError: boom"},
    ]
    monkeypatch.setattr(tune_module, "run_sweep", lambda spec, out: rows)
    assert main(["sweep", "--sweep", str(sweep), "--output-dir", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "3 trial(s), best first by val_agreement (objective: attacker)" in out
    assert "aspkd.k=5: 61.0% validation agreement, 60.5% test agreement, 80 calls, 3/3" in out
    assert "aspkd.k=3: 20.0% validation agreement, 19.0% test agreement, 27 calls, 1/3" in out
    assert "aspkd.k=7: failed: RuntimeError: boom" in out
    assert out.index("aspkd.k=5") < out.index("aspkd.k=3") < out.index("aspkd.k=7")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _info(env, tmp_path, *extra) -> dict:
    # Files, not pipes: Ray's daemons inherit the pipes and would hold them open.
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with out.open("w") as fo, err.open("w") as fe:
        code = subprocess.run([str(BIN / "aspkd"), "-q", "info", "--json", *extra], env=env,
                              stdout=fo, stderr=fe, timeout=180).returncode
    assert code == 0, err.read_text()[-2000:]
    return json.loads(out.read_text())


@pytest.mark.timeout(300)
def test_info_embedded_and_with_a_running_head(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    embedded = _info(env, tmp_path, "--address", "local")
    assert embedded["ray"]["resources"]["CPU"] >= 1
    assert "torch" in embedded["versions"]

    port = _free_port()
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=1",
         "--resources={\"aspkd_probe\": 3}", "--include-dashboard=false"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        # Wait for the head's GCS port before joining: a join during start-up can hang.
        deadline = time.time() + 120
        while time.time() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(1)
        time.sleep(5)
        info = _info({**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}, tmp_path)
        assert info["ray"]["resources"].get("aspkd_probe") == 3
        assert info["ray"]["address"].endswith(str(port))
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


# ---- Ray imported before aspkd_ray; two runs starting MLflow at once ----------------------

RAY_FIRST = """
import json
import ray  # before aspkd_ray: Ray has read RAY_AUTH_MODE (unset) already
import aspkd_ray
from aspkd_ray.runtime import connect

info = connect("local", num_cpus=1)
print(json.dumps({"cpus": info["resources"].get("CPU"), "mode": __import__("os").environ.get(
    "RAY_AUTH_MODE")}))
"""


@pytest.mark.timeout(200)
def test_embedded_ray_starts_when_ray_was_imported_first(tmp_path):
    """With ~/.ray/auth_token present, aspkd_ray turns token auth on; a script that imported
    ray first must still start (and join) its embedded Ray."""
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("0123456789abcdef" * 4)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
                        "RAY_AUTH_TOKEN_PATH")}
    env["HOME"] = str(home)
    script = tmp_path / "ray_first.py"
    script.write_text(RAY_FIRST)
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with out.open("w") as fo, err.open("w") as fe:
        code = subprocess.run([sys.executable, str(script)], env=env, stdout=fo, stderr=fe,
                              timeout=150, cwd=tmp_path).returncode
    assert code == 0, err.read_text()[-2000:]
    result = json.loads(out.read_text().strip().splitlines()[-1])
    assert result == {"cpus": 1.0, "mode": "token"}
    assert "InvalidAuthToken" not in err.read_text()


MLFLOW_RUN = """
import sys, time
from pathlib import Path

import mlflow

from aspkd_ray.config import from_dict
from aspkd_ray.tracking import mlflow_run

out, go, name = sys.argv[1:4]
cfg = from_dict({}, [f"output_dir={out}"])
Path(out, name + ".ready").touch()
while not Path(go).exists():  # both processes start creating the database together
    time.sleep(0.005)
with mlflow_run(cfg, name) as run:
    mlflow.log_metric("x", 1.0)
print(run.info.run_id)
"""


@pytest.mark.timeout(200)
def test_two_runs_create_one_mlflow_database_together(tmp_path):
    import sqlite3

    script = tmp_path / "run.py"
    script.write_text(MLFLOW_RUN)
    out, go = tmp_path / "out", tmp_path / "go"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    procs = [subprocess.Popen([sys.executable, str(script), str(out), str(go), name],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for name in ("a", "b")]
    deadline = time.time() + 120
    while not all((out / f"{n}.ready").exists() for n in ("a", "b")):
        assert time.time() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.01)
    go.touch()
    results = [p.communicate(timeout=150) for p in procs]
    for p, (_, stderr) in zip(procs, results, strict=True):
        assert p.returncode == 0, stderr[-3000:]
    ids = {stdout.strip().splitlines()[-1] for stdout, _ in results}
    with sqlite3.connect(out / "mlflow.db") as db:
        rows = {r[0] for r in db.execute("select run_uuid from runs")}
    assert rows == ids and len(ids) == 2


def test_ray_train_cleaner_noise_is_dropped(monkeypatch):
    """Ray Train's placement-group cleaner, where it cannot reach the State API, logs a
    warning a second and may die with a traceback; neither reaches our logs."""
    import logging
    import threading

    from aspkd_ray.runtime.ray_connect import quiet_train_cleaner

    uncaught = []  # the thread exceptions that would print a traceback
    monkeypatch.setattr(threading, "excepthook", lambda args: uncaught.append(args.thread.name))
    quiet_train_cleaner()
    quiet_train_cleaner()  # idempotent
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger(
        "ray.train.v2._internal.execution.controller.placement_group_cleaner")
    logger.addHandler(handler)
    try:
        logger.warning("Failed to query Ray Train Controller actor state. State API may be "
                       "temporarily unavailable. Continuing to monitor.")
        logger.warning("Detected that the Ray Train controller actor (x) is dead.")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == [
        "Detected that the Ray Train controller actor (x) is dead."]
    callback = logging.getLogger("ray.train.v2._internal.callbacks.placement_group_callback")
    callback.addHandler(handler)
    try:
        callback.error("Failed to stop PlacementGroupCleaner gracefully.")
        callback.error("Failed to register placement group with cleaner: x")
    finally:
        callback.removeHandler(handler)
    assert [r.getMessage() for r in records][1:] == [
        "Failed to register placement group with cleaner: x"]

    def fail():
        raise ConnectionError("Found multiple active Ray instances")

    for name in ("PlacementGroupCleanerMonitor", "another-thread"):
        thread = threading.Thread(target=fail, name=name)
        thread.start()
        thread.join()
    assert uncaught == ["another-thread"]  # other threads keep their tracebacks
