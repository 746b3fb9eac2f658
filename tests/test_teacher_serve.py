"""The attack-side labelling against a live `aspkd serve-victim` (MLflow model serving)."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import uuid

import numpy as np
import pytest
import requests
import torch

from aspkd_ray.config import load
from aspkd_ray.teacher.victims import victim_input

C = 10


@pytest.fixture(scope="module")
def victim_ckpt(tmp_path_factory):
    from aspkd_ray.models import create_model, save_checkpoint

    torch.manual_seed(1)
    model = create_model("digits_cnn", num_classes=C, in_chans=1, image_size=28)
    return str(save_checkpoint(model, tmp_path_factory.mktemp("victim") / "ck"))


def _local(ckpt, x):
    from aspkd_ray.models import load_checkpoint

    with torch.no_grad():
        return load_checkpoint(ckpt).eval()(x).softmax(1).numpy()


def _read_lines(stream, out: queue.Queue) -> None:
    for line in stream:
        out.put(line)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_attack_labelling_against_aspkd_serve_victim(ray_session, tmp_path, victim_ckpt,
                                                     capsys):
    from aspkd_ray.cli.main import main
    from aspkd_ray.evaluation.oracle import EvaluationOracle
    from aspkd_ray.teacher import connect_teacher_service

    common = ["--set", f"victim.checkpoint={victim_ckpt}", "--output-dir", str(tmp_path)]
    proc = subprocess.Popen([sys.executable, "-m", "aspkd_ray.cli.main", "-q", "serve-victim",
                             *common], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
    client = None
    try:
        url = None
        while url is None:
            line = lines.get(timeout=240)
            match = re.search(r"served at (http://127\.0\.0\.1:\d+)", line)
            url = match and match.group(1)
        cfg = load(None, [f"victim.endpoint={url}", "victim.batch_size=16",
                          f"output_dir={tmp_path}",
                          f"ray.teacher_service=teacher-{uuid.uuid4().hex[:8]}"], None)
        client = connect_teacher_service(cfg, C, budget=30)
        imgs = np.random.default_rng(0).integers(0, 256, (40, 28, 28, 1), dtype=np.uint8)
        ids, cls = [f"p{i}" for i in range(40)], np.arange(40) % C
        labels = client.buy(ids[:25], cls[:25], imgs[:25])  # two HTTP batches
        expected = _local(victim_ckpt, victim_input(imgs, cfg))
        np.testing.assert_allclose(labels, expected[:25], atol=1e-5)
        s = client.status()
        assert (s["spent"], s["left"], s["victim_samples_sent"]) == (25, 5, 25)
        # The experimenter's oracle reaches the same server, outside the budget.
        oracle = EvaluationOracle(cfg)
        assert oracle.predict_classes(imgs).tolist() == expected.argmax(1).tolist()
        assert client.status()["spent"] == 25
        assert main(["budget", *common]) == 0
        out = capsys.readouterr().out
        assert "spent:    25 of 30  (left 5)" in out and "unanswered (spent): 0" in out
    finally:
        if client is not None:
            client.shutdown()
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the CLI stops the server it started
        rc = proc.wait(60)
    assert rc == 0
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/ping", timeout=5)


def test_served_hard_victim_returns_class_ids_only(tmp_path, victim_ckpt):
    import mlflow.pyfunc

    from aspkd_ray.teacher.serving import save_victim_model

    cfg = load(None, [f"victim.checkpoint={victim_ckpt}", "victim.output=hard"], None)
    model = mlflow.pyfunc.load_model(str(save_victim_model(cfg, tmp_path / "m")))
    x = torch.rand(6, 1, 28, 28)
    out = np.asarray(model.predict(x.numpy()))
    assert out.dtype == np.int64 and out.shape == (6,)
    assert out.tolist() == _local(victim_ckpt, x).argmax(1).tolist()
