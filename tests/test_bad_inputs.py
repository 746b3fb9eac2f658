"""Every bad input gets a clear error: one line naming the problem, the right exit code, no
traceback, and the run's files (ledger, proxy set, summary.json) left byte for byte as they
were. Most rows run the CLI in this process on a copy of one prepared run folder and fail
before Ray starts (Ray is patched to refuse to start for them); the few that need Ray or a
live endpoint run `aspkd` in a subprocess.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from aspkd_ray.cli.main import main
from aspkd_ray.config import from_dict

BIN = Path(sys.executable).parent

PLUGIN = textwrap.dedent('''
    import numpy as np

    def make(config, class_names, device):
        def generate(prompts, class_ids, seeds):
            out = []
            for c, s in zip(class_ids, seeds):
                rng = np.random.default_rng(s)
                img = np.full((28, 28), 20.0 * c) + rng.normal(0, 15, (28, 28))
                out.append(np.clip(img, 0, 255).astype(np.uint8))
            return out
        return generate
''')

PER_CLASS, CLASSES, VAL_FRACTION = 20, 10, 0.15
TRAIN_POOL = PER_CLASS * CLASSES - round(PER_CLASS * CLASSES * VAL_FRACTION)  # 170


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A run folder as a finished attack leaves it: a proxy set (made without Ray), a ledger
    with two bought batches, summary.json. Built once; every row works on a copy."""
    from aspkd_ray.generation import generate_proxy, load_proxy_set
    from aspkd_ray.teacher.ledger import Ledger

    root = tmp_path_factory.mktemp("bad-inputs")
    plugin = root / "plugin.py"
    plugin.write_text(PLUGIN)
    sets = [f"cache_dir={root / 'cache'}", "generator.kind=plugin",
            f"generator.plugin={plugin}:make", "generator.batch_size=50",
            f"proxy.per_class={PER_CLASS}", f"proxy.val_fraction={VAL_FRACTION}",
            "budget.calls_per_class=2", "victim.training.max_epochs=2",
            "training.max_epochs=1", "training.patience=1", "ray.address=local"]
    run = root / "run"
    cfg = from_dict({}, sets + [f"output_dir={run}"])
    generate_proxy(cfg, run, executor="local")
    proxy = load_proxy_set(run / "proxy")
    train = np.flatnonzero(proxy.split == "train")
    ledger = Ledger(str(run / "ledger"), budget=20, output="soft", num_classes=CLASSES,
                    victim="local:test", writer="bad-inputs-fixture")
    for batch in (train[:2], train[2:5]):
        ids = [str(i) for i in proxy.ids[batch]]
        ledger.reserve(ids, proxy.classes[batch].tolist(), [""] * len(ids), [True] * len(ids))
        ledger.record_answers(ids, np.eye(CLASSES, dtype=np.float32)[proxy.classes[batch]])
    ledger.close()
    (run / "summary.json").write_text(json.dumps({"agreement": 50.0, "calls_used": 5}))
    args = [a for s in sets for a in ("--set", s)]
    return {"root": root, "run": run, "sets": sets, "args": args, "plugin": plugin}


@pytest.fixture
def run_copy(prepared, tmp_path) -> Path:
    return Path(shutil.copytree(prepared["run"], tmp_path / "run"))


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (names and sha256): nothing created, changed or deleted."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def no_ray(monkeypatch):
    """These rows must fail before Ray: starting it is a test failure, not a slow pass."""
    import aspkd_ray.runtime

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started for an input that should fail before it")

    monkeypatch.setattr(aspkd_ray.runtime, "connect", refuse)


# ---- damage to a run folder ------------------------------------------------------------

def _segment(run: Path, kind: str, last: bool = True) -> Path:
    files = sorted((run / "ledger" / kind).glob("*.parquet"))
    return files[-1] if last else files[0]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not what aspkd wrote " * 8)


def _damage(what: str, run: Path, tmp: Path) -> list[str]:
    """Apply one kind of damage (or write a bad config); return strings the message must
    hold (the file it names)."""
    shard = run / "proxy" / "part-00000.parquet"
    if what == "segment_truncated":
        seg = _segment(run, "reserved")
        _truncate(seg)
        return [seg.name, "corrupt"]
    if what == "segment_garbage":
        seg = _segment(run, "answered")
        _garbage(seg)
        return [seg.name, "corrupt"]
    if what == "reserved_deleted":
        _segment(run, "reserved").unlink()
        return ["missing"]
    if what == "meta_garbage":
        (run / "ledger" / "meta.json").write_bytes(b"{not json")
        return ["meta.json"]
    if what == "shard_deleted":
        shard.unlink()
        return [shard.name, "missing", "aspkd generate"]
    if what == "shard_garbage":
        _garbage(shard)
        return [shard.name, "aspkd generate"]
    if what == "shard_truncated":
        _truncate(shard)
        return [shard.name, "aspkd generate"]
    if what == "manifest_garbage":
        (run / "proxy" / "_manifest.json").write_text("[1, 2")
        return ["_manifest.json", "aspkd generate"]
    if what == "ledger_deleted":
        shutil.rmtree(run / "ledger")
        return ["no ledger"]
    raise KeyError(what)


def _config_file(kind: str, tmp: Path) -> Path:
    path = tmp / f"{kind}.yaml"
    path.write_text({"yaml_list": "- dataset\n- budget\n",
                     "yaml_scalar": "just some words\n",
                     "yaml_invalid": "budget: [1, 2\n",
                     "yaml_date": "seed: 2024-01-01\n",
                     "yaml_bad_section": "budget: 12\n"}[kind])
    return path


# (id, command, extra argv, damage or config kind, exit code, strings the message must hold)
# Extra argv may use {tmp} (a scratch folder) and {plugin} (the prepared plugin file).
ROWS = [
    ("unknown key", "steal", ["--set", "budget.calls=3"], None, 2,
     ["unknown key budget.calls", "calls_per_class"]),
    ("bad choice", "steal", ["--set", "victim.output=medium"], None, 2,
     ["victim.output", "'medium'", "soft, hard"]),
    ("bad type", "steal", ["--set", "aspkd.k=many"], None, 2, ["aspkd.k", "'many'", "integer"]),
    ("set without =", "steal", ["--set", "aspkd.sigma"], None, 2,
     ["--set", "aspkd.sigma", "dotted.key=value"]),
    ("set bad yaml", "steal", ["--set", "aspkd.sigma=[1"], None, 2, ["aspkd.sigma", "YAML"]),
    ("set empty key part", "steal", ["--set", "aspkd..k=3"], None, 2, ["aspkd..k", "empty"]),
    ("set value on a section", "steal", ["--set", "budget=12"], None, 2,
     ["budget", "12", "mapping"]),
    ("missing config file", "steal", ["--config", "{tmp}/nope.yaml"], None, 2,
     ["nope.yaml", "no such file"]),
    ("config is a folder", "steal", ["--config", "{tmp}"], None, 2, ["a folder"]),
    ("yaml list at top level", "steal", [], "yaml_list", 2,
     ["yaml_list.yaml", "top level is a list", "mapping"]),
    ("yaml scalar at top level", "steal", [], "yaml_scalar", 2,
     ["yaml_scalar.yaml", "top level is a string"]),
    ("invalid yaml", "steal", [], "yaml_invalid", 2, ["yaml_invalid.yaml", "not valid YAML"]),
    ("yaml date as seed", "steal", [], "yaml_date", 2, ["seed", "2024-01-01", "integer"]),
    ("value for a section", "steal", [], "yaml_bad_section", 2, ["budget", "mapping"]),
    ("negative budget", "steal", ["--set", "budget.total=-5"], None, 2,
     ["budget.total", "-5", ">= 0"]),
    ("negative proxy size", "generate", ["--set", "proxy.per_class=-1"], None, 2,
     ["proxy.per_class", ">= 1"]),
    ("zero lr", "steal", ["--set", "training.lr=0"], None, 2, ["training.lr", "> 0"]),
    ("unknown dataset", "steal", ["--set", "dataset.name=mnist2"], None, 2,
     ["dataset.name", "'mnist2'", "digits"]),
    ("unknown student architecture", "steal", ["--set", "student.architecture=resnet9000"],
     None, 2, ["student.architecture", "'resnet9000'", "digits_cnn_small"]),
    ("unknown victim architecture", "train-teacher", ["--set", "victim.architecture=cnn"],
     None, 2, ["victim.architecture", "'cnn'", "digits_cnn"]),
    ("plugin without factory", "generate", ["--set", "generator.plugin=nocolon"], None, 2,
     ["generator.plugin", "'nocolon'", "package.module:factory"]),
    ("plugin file missing", "generate", ["--set", "generator.plugin={tmp}/gone.py:make"],
     None, 2, ["generator.plugin", "gone.py", "not a file"]),
    ("plugin module missing", "generate", ["--set", "generator.plugin=no_such_pkg.gen:make"],
     None, 2, ["generator.plugin", "no_such_pkg", "cannot be imported"]),
    ("plugin file not python", "steal", ["--set", "generator.plugin={tmp}/bad.py:make",
                                         "--output-dir", "{tmp}/new-run"], None, 2,
     ["generator.plugin", "bad.py", "not valid Python"]),
    ("endpoint not http", "steal", ["--set", "victim.endpoint=ftp://host/x"], None, 2,
     ["victim.endpoint", "ftp://host/x", "http://"]),
    ("output dir is a file", "steal", ["--output-dir", "{tmp}/a-file"], None, 2,
     ["output_dir", "a-file", "folder"]),
    ("zero budget total", "steal", ["--set", "budget.total=0"], None, 2,
     ["budget.total=0", ">= 1", "prompt_only"]),
    ("zero calls per class", "steal", ["--set", "budget.calls_per_class=0"], None, 2,
     ["budget.calls_per_class=0", ">= 1"]),
    ("budget larger than the pool", "steal", ["--set", "budget.total=500"], None, 2,
     ["budget.total=500", f"{TRAIN_POOL} images", "proxy.per_class"]),
    ("budget larger than a pool not generated yet", "steal",
     ["--set", "budget.calls_per_class=30", "--output-dir", "{tmp}/new-run"], None, 2,
     ["budget.calls_per_class=30", f"{TRAIN_POOL} images"]),
    ("bought validation eats the budget", "steal",
     ["--set", "training.early_stopping=bought_val", "--set",
      "training.bought_val_per_class=2"], None, 2,
     ["training.bought_val_per_class", "20"]),
    ("victim checkpoint missing", "steal", ["--set", "victim.checkpoint={tmp}/no-victim"],
     None, 2, ["victim.checkpoint", "no-victim", "does not exist", "--train-victim"]),
    ("victim checkpoint not a checkpoint", "steal", ["--set", "victim.checkpoint={tmp}"],
     None, 2, ["victim.checkpoint", "holds no victim checkpoint"]),
    ("victim endpoint down", "steal",
     ["--set", "victim.endpoint=http://127.0.0.1:{port}/invocations"], None, 1,
     ["victim.endpoint", "cannot connect", "nothing was charged"]),
    ("resume with another budget", "steal", ["--set", "budget.calls_per_class=3"], None, 1,
     ["ledger", "budget=20", "asked 30"]),
    ("ledger segment truncated", "steal", [], "segment_truncated", 1, []),
    ("ledger segment garbage", "steal", [], "segment_garbage", 1, []),
    ("ledger reserved segment deleted", "steal", [], "reserved_deleted", 1, []),
    ("ledger meta.json garbage", "steal", [], "meta_garbage", 1, []),
    ("budget: ledger segment truncated", "budget", [], "segment_truncated", 1, []),
    ("budget: ledger segment garbage", "budget", [], "segment_garbage", 1, []),
    ("budget: reserved segment deleted", "budget", [], "reserved_deleted", 1, []),
    ("budget: meta.json garbage", "budget", [], "meta_garbage", 1, []),
    ("budget: no ledger", "budget", [], "ledger_deleted", 1, []),
    ("proxy shard deleted", "steal", [], "shard_deleted", 1, []),
    ("proxy shard garbage", "steal", [], "shard_garbage", 1, []),
    ("proxy shard truncated", "steal", [], "shard_truncated", 1, []),
    ("proxy manifest garbage", "steal", [], "manifest_garbage", 1, []),
    ("show-proxy: shard truncated", "show-proxy", ["--out", "{tmp}/grid.png"],
     "shard_truncated", 1, []),
]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the with block ends: nothing listens


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_is_one_clear_line(row, prepared, run_copy, tmp_path, capsys, no_ray):
    _, command, extra, kind, code, expected = row
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "a-file").write_text("not a folder")
    (scratch / "bad.py").write_text("def make(:\n")
    fill = {"tmp": str(scratch), "port": str(_closed_port()), "plugin": str(prepared["plugin"])}
    extra = [a.format(**fill) for a in extra]
    expected = [e.format(**fill) for e in expected]
    argv = [command, *prepared["args"], "--output-dir", str(run_copy)]
    if kind in ("yaml_list", "yaml_scalar", "yaml_invalid", "yaml_date", "yaml_bad_section"):
        argv += ["--config", str(_config_file(kind, scratch))]
    elif kind is not None:
        expected = expected + _damage(kind, run_copy, scratch)
    argv += extra  # a later --output-dir wins
    before = _snapshot(run_copy)

    rc = main(argv)

    err = capsys.readouterr().err
    assert rc == code, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("aspkd:")]
    assert len(lines) == 1, err
    for text in expected:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    assert _snapshot(run_copy) == before  # ledger, proxy set, summary.json untouched


@pytest.mark.parametrize("argv", [["steel"], ["steal", "--bogus", "1"]])
def test_bad_command_line_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: aspkd" in err and "Traceback" not in err


# ---- errors raised later, mapped to one line by the CLI ---------------------------------

def _raise_in_steal(monkeypatch, exc: BaseException) -> None:
    import aspkd_ray.jobs.steal

    def fake_run_steal(cfg, **kwargs):
        raise exc

    monkeypatch.setattr(aspkd_ray.jobs.steal, "run_steal", fake_run_steal)


def _victim_error():
    from aspkd_ray.teacher.errors import VictimError

    return VictimError("the victim failed: InvalidAnswer: victim answered non-JSON: "
                       "'<html>'. 3 charged samples are reserved but unanswered.",
                       [], np.zeros((0, 10), np.float32), ["a", "b", "c"])


def _budget_exhausted():
    from aspkd_ray.teacher.errors import BudgetExhausted

    return BudgetExhausted("budget exhausted: answered 2 of 5 samples, refused 3 (budget 20, "
                           "trial cap None).", ["a", "b"], np.zeros((2, 10), np.float32),
                           ["c", "d", "e"])


def _wrapped_in_ray(exc: BaseException) -> BaseException:
    """As ray.get raises an error from an actor: its text holds the remote traceback."""
    from ray.exceptions import RayTaskError

    remote = ("Traceback (most recent call last):\n  File \"service.py\", line 1, in buy\n"
              f"{type(exc).__name__}: {exc}")
    return RayTaskError("TeacherService.buy", remote, exc).as_instanceof_cause()


@pytest.mark.parametrize("make, expected", [
    (_victim_error, "the victim failed: InvalidAnswer"),
    (_budget_exhausted, "budget exhausted: answered 2 of 5"),
    (lambda: _wrapped_in_ray(_victim_error()), "the victim failed: InvalidAnswer"),
    (lambda: _wrapped_in_ray(_budget_exhausted()), "refused 3"),
], ids=["victim error", "budget exhausted", "victim error from an actor",
        "budget exhausted from an actor"])
def test_late_errors_are_one_line(make, expected, prepared, tmp_path, capsys, monkeypatch):
    _raise_in_steal(monkeypatch, make())
    rc = main(["steal", *prepared["args"], "--output-dir", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 1
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("aspkd:")]
    assert expected in line


def test_a_programming_error_keeps_its_traceback(prepared, tmp_path, monkeypatch):
    _raise_in_steal(monkeypatch, KeyError("round_done"))
    with pytest.raises(KeyError, match="round_done"):
        main(["steal", *prepared["args"], "--output-dir", str(tmp_path / "x")])


def test_a_subcommand_that_fails_to_import_is_an_error(monkeypatch):
    import aspkd_ray.cli.main as cli

    monkeypatch.setattr(cli, "COMMANDS", [*cli.COMMANDS, "aspkd_ray.cli.no_such_stage"])
    with pytest.raises(ImportError, match="aspkd_ray.cli.no_such_stage"):
        cli.build_parser()


# ---- `aspkd generate` repairs what the errors above tell the user to repair -------------

@pytest.mark.parametrize("damage", ["shard_deleted", "shard_garbage", "shard_truncated",
                                    "manifest_garbage"])
def test_generate_regenerates_bad_shards(damage, prepared, run_copy, tmp_path):
    from aspkd_ray.generation import generate_proxy, load_proxy_set

    original = load_proxy_set(prepared["run"] / "proxy")
    _damage(damage, run_copy, tmp_path)
    cfg = from_dict({}, prepared["sets"] + [f"output_dir={run_copy}"])
    generate_proxy(cfg, run_copy, executor="local")  # what `aspkd generate` runs, minus Ray
    repaired = load_proxy_set(run_copy / "proxy")
    assert repaired.ids.tolist() == original.ids.tolist()
    assert np.array_equal(repaired.images, original.images)


# ---- subprocesses: a live (bad) endpoint, and the same folder working ------------------

class _BadVictim(http.server.BaseHTTPRequestHandler):
    """Answers every prediction with what a broken server sends."""

    def do_POST(self):  # noqa: N802 - the http.server interface
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path.startswith("/html"):
            body, status, kind = b"<html>maintenance</html>", 200, "text/html"
        elif self.path.startswith("/json-list"):
            body, status, kind = b'{"predictions": "not numbers"}', 200, "application/json"
        else:
            body, status, kind = b"internal error", 500, "text/plain"
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def bad_victim():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BadVictim)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _aspkd(args: list[str], tmp: Path, timeout: int = 400) -> tuple[int, str]:
    # Files, not pipes: Ray's daemons inherit the pipes and would hold them open.
    out = tmp / "out.txt"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with out.open("w") as fo:
        rc = subprocess.run([str(BIN / "aspkd"), *args], env=env, stdout=fo,
                            stderr=subprocess.STDOUT, timeout=timeout).returncode
    return rc, out.read_text()


@pytest.mark.parametrize("path, expected", [("/html", "non-JSON"), ("/json-list", "numeric"),
                                            ("/error", "HTTP 500")])
def test_each_kind_of_bad_answer_is_named(path, expected, bad_victim):
    """What the victim client says of each broken answer: the text the one-line error
    carries (the end-to-end path below is the same for every kind)."""
    import torch

    from aspkd_ray.teacher.errors import InvalidAnswer
    from aspkd_ray.teacher.http_victim import HttpVictim, HttpVictimError

    victim = HttpVictim(f"{bad_victim}{path}", protocol="mlflow", output="soft",
                        num_classes=10, max_retries=0)
    with pytest.raises((InvalidAnswer, HttpVictimError), match=expected):
        victim.predict(torch.zeros(2, 1, 28, 28))


@pytest.mark.timeout(400)
@pytest.mark.parametrize("path, expected", [("/json-list", "numeric")],
                         ids=["malformed predictions"])
def test_a_bad_victim_answer_is_one_line(path, expected, prepared, run_copy, bad_victim,
                                         tmp_path):
    """The first purchase (a bought validation subset, in the driver) meets a broken server:
    one line, exit 1. Its samples are charged in a ledger of their own, as the budget says.
    (Every kind of bad answer takes this path; test_each_kind_of_bad_answer_is_named checks
    what each one says.)"""
    keep = {k: v for k, v in _snapshot(run_copy).items() if not k.startswith("ledger")}
    rc, log = _aspkd(["-q", "steal", *prepared["args"], "--output-dir", str(run_copy),
                      "--set", f"victim.endpoint={bad_victim}{path}",
                      "--set", "victim.max_retries=0",
                      "--set", "training.early_stopping=bought_val",
                      "--set", "training.bought_val_per_class=1",
                      "--set", f"budget.ledger={tmp_path / 'ledger'}",
                      "--set", f"ray.teacher_service=t-bad-victim{path.replace('/', '-')}"],
                     tmp_path)
    assert rc == 1, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    (line,) = [line for line in log.splitlines() if line.startswith("aspkd:")]
    assert "victim failed" in line and expected in line, line
    after = _snapshot(run_copy)
    assert {k: v for k, v in after.items() if k in keep} == keep  # proxy, summary.json


@pytest.mark.timeout(600)
def test_the_prepared_folder_works_and_ends_without_a_traceback(prepared, run_copy, tmp_path):
    """The control row: the same folder and settings, with a fresh ledger, attack fine; the
    log ends without a traceback (Ray Train's placement-group cleaner included)."""
    rc, log = _aspkd(["steal", *prepared["args"], "--output-dir", str(run_copy),
                      "--set", f"budget.ledger={tmp_path / 'ledger'}",
                      "--set", "ray.teacher_service=t-bad-inputs-control"], tmp_path, 580)
    assert rc == 0, log[-3000:]
    assert "Traceback" not in log, log[log.find("Traceback") - 500:][:3000]
    assert "Failed to query Ray Train Controller" not in log
    assert "teacher calls used: 20 of 20" in log
