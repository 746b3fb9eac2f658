"""Serve a trained victim as a real HTTP API with MLflow model serving, on loopback.

`save_victim_model` writes an MLflow pyfunc model around the victim checkpoint (a tensor
signature N x C x H x W float32 in, probabilities or class ids out, as the victim's output mode
says: a hard-label server never sends probabilities). `start_victim_server` runs
`mlflow models serve --env-manager local` on it (this environment, no downloads) and waits
until it answers; the attack then reaches it with victim.endpoint=<url>.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import mlflow.pyfunc
import numpy as np

from aspkd_ray.config import Config

LOOPBACK = "127.0.0.1"


class VictimPyfunc(mlflow.pyfunc.PythonModel):
    """The victim checkpoint behind MLflow's scoring protocol."""

    # The tensor signature is declared on save; no type-hint validation (and its warning).
    _skip_type_hint_validation = True

    output = "soft"

    def load_context(self, context) -> None:
        from aspkd_ray.models import load_checkpoint

        self.output = (context.model_config or {}).get("output", "soft")
        self.model = load_checkpoint(context.artifacts["checkpoint"]).eval()

    def predict(self, context, model_input, params=None):
        import torch

        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.inference_mode():
            logits = self.model(x).float()
        if self.output == "hard":
            return logits.argmax(1).numpy().astype(np.int64)
        return logits.softmax(1).numpy()


def save_victim_model(cfg: Config, dest: str | Path) -> Path:
    """Write the configured victim (victim.checkpoint or the cache) as an MLflow pyfunc model."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    from aspkd_ray import cache
    from aspkd_ray.layout import input_shape, victim_location
    from aspkd_ray.models.checkpoint import ARCH

    location = victim_location(cfg)
    if not cache.exists(location, ARCH):
        raise FileNotFoundError(f"victim checkpoint {location} not found; train it first with "
                                f"`aspkd train-teacher` (same config) or set victim.checkpoint.")
    ckpt = cache.local_copy(location, ARCH).resolve()  # a URI: this process's local mirror
    import json

    classes = json.loads((ckpt / ARCH).read_text())["num_classes"]
    size, chans = input_shape(cfg)
    out = (TensorSpec(np.dtype(np.int64), (-1,)) if cfg.victim.output == "hard"
           else TensorSpec(np.dtype(np.float32), (-1, classes)))
    sig = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32),
                                                   (-1, chans, size, size))]),
                         outputs=Schema([out]))
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    pkg = Path(__file__).resolve().parents[1]  # aspkd_ray/, so the model loads anywhere
    with warnings.catch_warnings(), _env(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"):
        warnings.filterwarnings("ignore", message=".*input example was not provided")
        mlflow.pyfunc.save_model(
            str(dest), python_model=str(Path(__file__).with_name("pyfunc_model.py")),
            model_config={"output": cfg.victim.output},
            artifacts={"checkpoint": str(ckpt)}, signature=sig, code_paths=[str(pkg)],
            # Given, not inferred: inference would load the model in a subprocess.
            pip_requirements=["torch", "numpy", f"mlflow=={mlflow.__version__}"])
    return dest


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _child_setup() -> None:
    os.setsid()  # its own process group, so stop_victim_server stops uvicorn too
    try:  # and die with us (Linux): never leave a victim server behind
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def start_victim_server(cfg: Config, port: int | None = None, host: str = LOOPBACK,
                        startup_timeout_s: float = 180.0,
                        model_dir: str | Path | None = None) -> tuple[str, subprocess.Popen]:
    """Serve the victim with `mlflow models serve`; return (base URL, process) once it answers.

    The server listens on loopback unless `host` says otherwise (the CLI's --host), and runs in
    this environment (--env-manager local). Stop it with stop_victim_server(process).
    """
    import requests

    port = port or free_port(host)
    own_dir = model_dir is None
    model_dir = Path(model_dir or tempfile.mkdtemp(prefix="aspkd-victim-")) / "model"
    save_victim_model(cfg, model_dir)
    log_path = model_dir.parent / "server.log"
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # uvicorn
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model_dir),
           "--env-manager", "local", "--host", host, "--port", str(port), "--workers", "1"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=_child_setup)
    proc.model_dir = model_dir.parent if own_dir else None  # removed by stop_victim_server
    proc.log_path = log_path
    url = f"http://{LOOPBACK if host in ('0.0.0.0', '') else host}:{port}"
    deadline = time.monotonic() + startup_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            stop_victim_server(proc)
            raise RuntimeError(f"mlflow models serve exited with code {proc.returncode}:\n{tail}")
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                return url, proc
        except requests.RequestException:
            pass
        time.sleep(0.5)
    stop_victim_server(proc)
    raise TimeoutError(f"the victim server did not answer on {url} within "
                       f"{startup_timeout_s:.0f} s; see {log_path}.")


def stop_victim_server(process: subprocess.Popen, timeout_s: float = 15.0) -> int | None:
    """Stop the server and its workers (SIGTERM, then SIGKILL); remove its temporary model."""
    try:  # the whole group: `mlflow models serve` and the uvicorn it started
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout_s)
    folder = getattr(process, "model_dir", None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
    return process.returncode
