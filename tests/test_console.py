"""The console a person reads: stage lines and bars of our own, Ray's output in its log files
(back on the console with -v), and the demo's report with its reference baselines and grid."""

import json
import logging
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_steal import PLUGIN  # the tests folder is on sys.path (pytest rootdir)

from aspkd_ray import console

REPO = Path(__file__).resolve().parents[1]
# What Ray prints when its output reaches the console (worker logs forwarded to the driver,
# Ray Data's progress dumps, Ray Train's controller and workers, the cleaner's warnings).
RAY_SPAM = ("PlacementGroupCleaner", "(RayTrainWorker", "(TrainController", "Running Dataset",
            "Tip:", "logging_progress.py", "Started a local Ray instance",
            "Progress bars disabled")


@pytest.fixture
def normal():
    console.configure(console.NORMAL)
    yield
    console.configure(console.NORMAL)


def test_stage_lines_say_what_ended_and_how_long(normal, capsys):
    with console.stage("victim") as victim:
        victim.start("training")
        victim.detail = "trained"
    with console.stage("attack") as st:
        st.elapsed = 65.2  # a time measured elsewhere
    with pytest.raises(RuntimeError), console.stage("proxy set"):
        raise RuntimeError("boom")
    took = victim.seconds()
    time.sleep(0.05)
    assert victim.seconds() == took  # the time is frozen when the stage ends
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "victim: training …"
    assert err[1].startswith("victim: trained (") and err[1].endswith(" s)")
    assert err[2] == "attack: done (65 s)"
    assert err[3].startswith("proxy set: failed after ")
    console.configure(console.QUIET)
    with console.stage("victim"):
        pass
    assert capsys.readouterr().err == ""


def test_bars_off_a_terminal_print_a_few_lines(normal, capsys):
    bar = console.progress("proxy set", 16, "shards")
    for _ in range(16):
        bar.advance()
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    # a line at each quarter, never one per step
    assert [line.split(" (")[0] for line in lines] == [
        f"  proxy set: {n}/16 shards" for n in (4, 8, 12, 16)]


def test_watch_polls_in_the_background_and_survives_a_failing_poll(normal, capsys):
    seen = iter([(0, 4), RuntimeError("not there yet"), (2, 4), (4, 4)])

    def poll():
        item = next(seen, (4, 4))
        if isinstance(item, Exception):
            raise item
        return item

    with console.watch("attack", poll, "rounds", every_s=0.05):
        time.sleep(0.5)
    err = capsys.readouterr().err
    assert "  attack: 2/4 rounds (" in err and "  attack: 4/4 rounds (" in err


def test_ray_console_filter_follows_the_level(normal):
    from aspkd_ray.runtime.ray_connect import _RayConsole

    f = _RayConsole()

    def record(level, msg):
        return logging.LogRecord("ray.data", level, __file__, 1, msg, None, None)

    assert not f.filter(record(logging.INFO, "Starting execution of Dataset x"))
    assert not f.filter(record(logging.WARNING, "Progress bars disabled. To enable, ..."))
    assert f.filter(record(logging.WARNING, "the cluster has no GPU"))
    console.configure(console.VERBOSE)
    assert f.filter(record(logging.INFO, "Starting execution of Dataset x"))


def test_info_records_wait_for_the_driver_log_file(tmp_path):
    log = console._DriverLog()  # the process's own one may be open already

    def record(msg):
        return logging.LogRecord("aspkd_ray.test", logging.INFO, __file__, 1, msg, None, None)

    log.emit(record("before the file exists"))
    log.open(tmp_path / "driver.log")
    log.emit(record("after"))
    log.close()
    text = (tmp_path / "driver.log").read_text()
    assert "before the file exists" in text and "after" in text


def test_reference_baselines_from_the_committed_benchmark():
    from aspkd_ray.jobs.demo import reference_baselines

    refs = reference_baselines("digits", "aspkd")
    assert set(refs["agreement"]) == {"prompt_only", "vanilla", "aspkd"}
    bench = json.loads((REPO / "scripts/results/aspkd.json").read_text())
    vanilla = [r["agreement"] for r in bench["runs"]
               if r["scenario"] == "digits" and r["method"] == "vanilla"]
    assert refs["agreement"]["vanilla"]["mean"] == round(sum(vanilla) / len(vanilla), 1)
    assert "not measured by this run" in refs["source"]
    assert reference_baselines("no-such-scenario", "aspkd") is None




def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_DEDUP_LOGS")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(args: list[str], tmp_path: Path, name: str, timeout: int) -> tuple[int, str]:
    # One file for both streams, as a person sees them; files, not pipes: Ray's daemons
    # inherit the pipes and would hold them open.
    out = tmp_path / f"{name}.txt"
    with out.open("w") as fo:
        code = subprocess.run([sys.executable, *args], env=_env(), stdout=fo,
                              stderr=subprocess.STDOUT, timeout=timeout,
                              cwd=tmp_path).returncode
    return code, out.read_text()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_console_has_our_stage_lines_and_no_ray_spam(tmp_path):
    plugin = tmp_path / "digits_plugin.py"
    plugin.write_text(PLUGIN)
    out = tmp_path / "run"
    sets = [f"cache_dir={tmp_path / 'cache'}", "generator.kind=plugin",
            f"generator.plugin={plugin}:make", "generator.batch_size=50",
            "proxy.per_class=20", "budget.calls_per_class=2", "victim.training.max_epochs=2",
            "training.max_epochs=1", "training.patience=1", "ray.address=local",
            "ray.teacher_service=t-console"]
    code, text = _run(["-m", "aspkd_ray.cli.main", "demo", "--output-dir", str(out),
                       *[a for s in sets for a in ("--set", s)]], tmp_path, "demo", 840)
    assert code == 0, text[-3000:]
    lines = text.splitlines()
    for spam in RAY_SPAM:
        assert not [line for line in lines if spam in line], (spam, text[-3000:])
    # Each stage once, in order (a stage told twice means two layers report it).
    starts = [line.split(":")[0] for line in lines
              if line.split(":")[0] in ("ray", "victim", "proxy set", "attack", "evaluation")
              and not line.endswith("…")]
    assert starts == ["ray", "victim", "proxy set", "attack", "evaluation"], text
    assert any(line.startswith("victim: trained (") for line in lines), text
    assert any(line.startswith("proxy set: 200 images (generated, ") for line in lines), text
    assert any(line.startswith("evaluation: ") and "% agreement" in line for line in lines)
    assert any(line.startswith("attack: 2 round(s), 20 of 20 teacher calls (")
               for line in lines), text
    assert "reference agreement (benchmark" in text and "prompt-only" in text
    assert len(lines) < 40, text

    summary = json.loads((out / "summary.json").read_text())
    assert summary["reference_baselines"]["agreement"]["vanilla"]["seeds"] >= 1
    assert (out / "proxy_grid.png").stat().st_size > 1000
    assert summary["wall_time_s"]["victim"] > 0.5  # the demo's own stage, not run_steal's
    with sqlite3.connect(out / "mlflow.db") as db:
        metrics = {r[0] for r in db.execute("select key from metrics where run_uuid=?",
                                            (summary["mlflow_run_id"],))}
    assert {"agreement_final", "reference_vanilla_agreement", "time_victim_s"} <= metrics
    artifacts = Path(summary["output_dir"]) / "mlflow-artifacts"
    assert list(artifacts.rglob("proxy_grid.png")) and \
        list(artifacts.rglob("reference_baselines.json"))


WORKER_PRINTS = """
import sys, time
import ray
from aspkd_ray import console
from aspkd_ray.runtime import connect

console.configure(console.VERBOSE if sys.argv[1] == "-v" else console.NORMAL)
connect("local", num_cpus=1)

@ray.remote
def hello():
    print("hello-from-a-ray-worker", flush=True)

ray.get(hello.remote())
time.sleep(3)  # worker output reaches the driver asynchronously
"""


@pytest.mark.timeout(300)
def test_verbose_brings_ray_output_back(tmp_path):
    script = tmp_path / "worker_prints.py"
    script.write_text(WORKER_PRINTS)
    for flag, shown in (("-v", True), ("-", False)):
        code, text = _run([str(script), flag], tmp_path, f"run{flag}", 240)
        assert code == 0, text[-3000:]
        assert ("hello-from-a-ray-worker" in text) == shown, (flag, text[-3000:])
        assert ("Started a local Ray instance" in text) == shown, (flag, text[-3000:])
