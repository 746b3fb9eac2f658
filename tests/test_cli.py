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
