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


def _subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_every_subcommand_has_help(capsys):
    names = _subcommands()
    assert {"info", "train-teacher"} <= set(names)
    for name in names:
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0
        assert "usage: aspkd " + name in capsys.readouterr().out


def test_bad_override_is_reported_with_the_key(capsys, tmp_path):
    code = main(["train-teacher", "--output-dir", str(tmp_path), "--set", "victim.output=x"])
    assert code == 2
    err = capsys.readouterr().err
    assert "victim.output" in err and "'x'" in err


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
