"""Running a multi-node scenario: a script that builds its own `ray.cluster_utils.Cluster` runs
in a subprocess (the session's embedded Ray stays untouched) and prints one `RESULT <json>`
line; the test asserts on that dict."""

from __future__ import annotations

import json
import os
import subprocess
import sys

MARK = "RESULT "


def run_cluster_script(script: str, *args: str, timeout: float = 400) -> dict:
    """Run `script` (Python source) with `args`; return its RESULT dict or fail with its
    output. The child inherits this environment (the tests' S3 endpoint) but no RAY_ADDRESS."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                          text=True, timeout=timeout, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    assert proc.returncode == 0 and lines, (proc.stdout[-3000:], proc.stderr[-5000:])
    return json.loads(lines[-1][len(MARK):])
