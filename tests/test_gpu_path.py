"""victim.device on a machine without a GPU: where the victim goes, what Ray is asked for,
and the GPU check script's smoke run (every part present, each a result, a skip or an error).

Clusters are fake resource dicts where the answer must not depend on this machine; the one
test with Ray uses the session's CPU-only instance.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from aspkd_ray.config import ConfigError, load
from aspkd_ray.teacher import victims
from aspkd_ray.teacher.victims import gpu_request, torch_device

ROOT = Path(__file__).resolve().parents[1]
C = 10


def make_cfg(tmp_path, *overrides):
    import uuid

    return load(None, [f"output_dir={tmp_path}", "ray.namespace=aspkd-gpu-tests",
                       f"ray.teacher_service=gpu-{uuid.uuid4().hex[:8]}", *overrides], None)


def images(n):
    return np.random.default_rng(0).integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)


# ---- the driver's decision -------------------------------------------------------------

def test_cpu_never_asks_for_a_gpu():
    assert gpu_request("cpu", {"CPU": 16, "GPU": 8}) == 0


def test_auto_follows_the_cluster():
    assert gpu_request("auto", {"CPU": 2}) == 0
    assert gpu_request("auto", {"CPU": 2, "GPU": 0.0}) == 0
    assert gpu_request("auto", {"CPU": 16, "GPU": 1.0}) == 1
    # Ray Train holds every GPU: the victim stays on CPU rather than starve it.
    assert gpu_request("auto", {"GPU": 1.0}, train_gpus=1.0) == 0
    assert gpu_request("auto", {"GPU": 4.0}, train_gpus=3.0) == 1


def test_cuda_without_a_gpu_is_one_clear_line():
    with pytest.raises(ConfigError, match=r"victim\.device=cuda.*no GPU") as err:
        gpu_request("cuda", {"CPU": 2})
    assert "\n" not in str(err.value) and err.value.exit_code == 2
    assert gpu_request("cuda", {"GPU": 2.0}) == 1
    assert gpu_request("cuda", {"CPU": 2}, autoscale=True) == 1  # waits for a GPU node


def test_cuda_beside_a_train_that_takes_every_gpu_is_refused():
    with pytest.raises(ConfigError, match=r"victim\.device=cuda.*Ray Train takes 1.*"
                                          r"ray\.use_gpu=false") as err:
        gpu_request("cuda", {"GPU": 1.0}, train_gpus=1.0)
    assert "ray.num_workers" not in str(err.value)  # no Train size would leave a GPU
    with pytest.raises(ConfigError, match=r"ray\.num_workers=3"):
        gpu_request("cuda", {"GPU": 4.0}, train_gpus=4.0)
    assert gpu_request("cuda", {"GPU": 4.0}, train_gpus=3.0) == 1


def test_an_unknown_device_names_the_key():
    with pytest.raises(ConfigError, match=r"victim\.device: got 'gpu'"):
        gpu_request("gpu", {"GPU": 1.0})


def test_in_the_process_cuda_only_when_asked_for_and_seen(monkeypatch):
    assert torch_device(False, "cuda") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert torch_device(True, "cuda") == "cpu"  # asked, but torch sees none: CPU, warned
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert torch_device(True, "auto") == "cuda"
    assert torch_device(False, "auto") == "cpu"  # a GPU not asked for is not this process's


def test_service_asks_ray_for_the_gpu_and_leaves_a_gpuless_head(tmp_path):
    from aspkd_ray.teacher.service import placement, service_options

    assert placement("head") == {"num_cpus": 0, "resources": {"node:__internal_head__": 0.001}}
    assert "num_gpus" not in placement("any")
    assert placement("head", 1, head_gpus=0.0) == {"num_cpus": 0, "num_gpus": 1}
    assert placement("head", 1, head_gpus=2.0) == {
        "num_cpus": 0, "num_gpus": 1, "resources": {"node:__internal_head__": 0.001}}
    assert placement("any", 1)["num_gpus"] == 1
    assert placement("gpu_pool", 1) == {"num_cpus": 0, "num_gpus": 1,
                                        "resources": {"gpu_pool": 0.001}}
    cfg = make_cfg(tmp_path, "victim.device=cuda")
    opts = service_options(cfg, gpu_request("cuda", {"GPU": 1.0}))
    assert opts["num_gpus"] == 1 and opts["max_restarts"] == -1
    assert "num_gpus" not in service_options(cfg, gpu_request("auto", {"CPU": 2}))


def test_service_gpus_reads_the_cluster_and_ignores_http_victims(tmp_path, monkeypatch):
    from aspkd_ray.teacher import service

    monkeypatch.setattr(victims, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(service, "_train_gpus", lambda cfg: 0.0)
    with pytest.raises(ConfigError, match="victim.device=cuda"):
        service.service_gpus(make_cfg(tmp_path, "victim.device=cuda"))
    assert service.service_gpus(make_cfg(tmp_path, "victim.device=cuda",
                                         "victim.endpoint=http://127.0.0.1:9")) == 0
    monkeypatch.setattr(victims, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 1.0})
    assert service.service_gpus(make_cfg(tmp_path, "victim.device=auto")) == 1
    monkeypatch.setattr(service, "_train_gpus", lambda cfg: 1.0)
    assert service.service_gpus(make_cfg(tmp_path, "victim.device=auto")) == 0


# ---- the victim's process ----------------------------------------------------------------

def test_local_victim_honours_its_device(tmp_path, victim_ckpt):
    from aspkd_ray.teacher.victims import LocalVictim

    cpu = LocalVictim(victim_ckpt, "soft", C, device="cpu")
    assert cpu.device == "cpu" and next(cpu.model.parameters()).device.type == "cpu"
    assert cpu.predict(victims.victim_input(images(3), make_cfg(tmp_path))).shape == (3, C)
    # Not hard-wired to the CPU: the weights go wherever they are sent.
    meta = LocalVictim(victim_ckpt, "soft", C, device="meta")
    assert next(meta.model.parameters()).device.type == "meta"


def test_make_victim_resolves_the_device_when_none_is_given(tmp_path, victim_ckpt,
                                                            monkeypatch):
    monkeypatch.setattr(victims, "cluster_resources", lambda: {"GPU": 1.0})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = make_cfg(tmp_path, f"victim.checkpoint={victim_ckpt}", "victim.device=auto")
    assert victims.make_victim(cfg, C).device == "cpu"  # the cluster has one, torch here not
    assert victims.make_victim(cfg, C, device="meta").device == "meta"


def test_the_service_puts_its_victim_where_it_was_asked(tmp_path, victim_ckpt):
    """The actor class, run here without Ray: a GPU asked for but not seen gives a CPU
    victim, and describe() says where it runs."""
    from aspkd_ray.teacher import Ledger
    from aspkd_ray.teacher.service import TeacherService, _resolved

    cfg = _resolved(make_cfg(tmp_path, f"victim.checkpoint={victim_ckpt}",
                             "victim.device=cuda"))
    Ledger(str(tmp_path / "ledger"), budget=10, output="soft", num_classes=C)
    svc = TeacherService(cfg, C, 10, str(tmp_path / "ledger"), gpus=1)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert svc.victim.device == expected and svc.describe()["victim_device"] == expected
    svc.close()


# ---- the evaluation oracle uses the same rule --------------------------------------------

def test_oracle_uses_the_same_resolution(tmp_path, victim_ckpt, monkeypatch):
    from aspkd_ray.evaluation.oracle import EvaluationOracle

    ckpt = f"victim.checkpoint={victim_ckpt}"
    monkeypatch.setattr(victims, "cluster_resources", lambda: {"CPU": 2.0})
    with pytest.raises(ConfigError, match=r"victim\.device=cuda.*no GPU"):
        EvaluationOracle(make_cfg(tmp_path, ckpt, "victim.device=cuda"))
    assert EvaluationOracle(make_cfg(tmp_path, ckpt, "victim.device=auto")).device == "cpu"
    # An HTTP victim ignores victim.device (no server needed to build the oracle).
    http = EvaluationOracle(make_cfg(tmp_path, "victim.endpoint=http://127.0.0.1:9",
                                     "victim.device=cuda"))
    assert http.device == "cpu"

    monkeypatch.setattr(victims, "cluster_resources", lambda: {"CPU": 2.0, "GPU": 1.0})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    oracle = EvaluationOracle(make_cfg(tmp_path, ckpt, "victim.device=cuda"))
    assert oracle.device == "cpu" and oracle.victim.device == "cpu"  # none seen here
    assert oracle.predict_classes(images(4)).shape == (4,)
    seen = []
    monkeypatch.setattr(victims, "local_victim_device",
                        lambda cfg: seen.append(cfg.victim.device) or "meta")
    assert EvaluationOracle(make_cfg(tmp_path, ckpt, "victim.device=auto")).device == "meta"
    assert seen == ["auto"]


# ---- through Ray -------------------------------------------------------------------------

@pytest.mark.timeout(240)
def test_cuda_on_the_gpuless_test_cluster_fails_before_any_ledger(ray_session, tmp_path,
                                                                  victim_ckpt):
    import ray

    from aspkd_ray.teacher import connect_teacher_service

    assert ray.cluster_resources().get("GPU", 0) == 0
    cfg = make_cfg(tmp_path, f"victim.checkpoint={victim_ckpt}", "victim.device=cuda")
    with pytest.raises(ConfigError, match=r"victim\.device=cuda.*no GPU"):
        connect_teacher_service(cfg, C, budget=5)
    assert not (tmp_path / "ledger").exists()
    with pytest.raises(ValueError):  # the name was never taken
        ray.get_actor(cfg.ray.teacher_service, namespace=cfg.ray.namespace)


# ---- the GPU check script ----------------------------------------------------------------

PARTS = ("text2image", "ddp", "knn", "digits_attack")


@pytest.mark.timeout(300)
def test_gpu_check_smoke_runs_every_part(tmp_path):
    out = tmp_path / "gpu-smoke"
    kept = ROOT / "benchmarks" / "gpu.json"
    before = kept.stat().st_mtime_ns if kept.exists() else None
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--smoke",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "gpu.json").read_text())
    assert (out / "gpu.md").is_file() and "| part |" in proc.stdout
    assert result["smoke"] is True and set(result["parts"]) == set(PARTS)
    statuses = {name: part["status"] for name, part in result["parts"].items()}
    assert set(statuses.values()) <= {"ok", "skipped", "error"}, statuses
    for name, part in result["parts"].items():
        if part["status"] == "error":
            assert part["error"], name
        if part["status"] == "skipped":
            assert part["reason"], name
    assert set(statuses.values()) != {"error"}
    # On a CPU every part but the attack runs: none may fail.
    assert "error" not in statuses.values(), {n: p.get("error") for n, p in
                                              result["parts"].items()}
    if not torch.cuda.is_available():
        assert statuses["digits_attack"] == "skipped"
        assert result["parts"]["digits_attack"]["reason"] == "no CUDA"
    # What runs on a CPU ran, and measured something.
    t2i = result["parts"]["text2image"]
    assert t2i["ray"]["images"] == t2i["loop"]["images"] > 0
    assert t2i["ray"]["images_per_s"] > 0 and t2i["loop"]["images_per_s"] > 0
    assert result["parts"]["ddp"]["step_ms"]["median"] > 0
    assert result["parts"]["knn"]["cpu"]["seconds"] > 0
    # --smoke never writes the kept benchmark figures.
    assert (kept.stat().st_mtime_ns if kept.exists() else None) == before
