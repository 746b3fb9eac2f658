"""The digits pipeline with its storage root on object storage (moto's S3 on 127.0.0.1):
generate → steal → resume → a 2-trial sweep, against the same run on a local folder."""

from __future__ import annotations

import json

import pyarrow.fs as pafs
import pytest
import yaml
from test_steal import PLUGIN

from aspkd_ray import storage
from aspkd_ray.config import from_dict


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("s3-pipeline")
    plugin = root / "digits_plugin.py"
    plugin.write_text(PLUGIN)
    return root, [f"cache_dir={root / 'cache'}", "generator.kind=plugin",
                  f"generator.plugin={plugin}:make", "generator.batch_size=50",
                  "proxy.per_class=12", "budget.calls_per_class=2",
                  "victim.training.max_epochs=1", "training.max_epochs=1",
                  "training.patience=1"]


def _objects(uri: str) -> dict[str, int]:
    fs, root = storage.resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return {i.path[len(root) + 1:]: i.size for i in infos if i.type == pafs.FileType.File}


def _files(folder) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in folder.rglob("*") if p.is_file()}


def _charged(ledger: str) -> list[str]:
    from aspkd_ray.teacher import Ledger

    rows = Ledger(ledger, create=False).charge_rows().to_pydict()
    return sorted(i for i, c in zip(rows["id"], rows["charge"], strict=True) if c)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_steal_on_s3_equals_the_local_run_and_resumes(ray_session, sets, s3_root):
    from aspkd_ray.generation import load_proxy_set
    from aspkd_ray.jobs.steal import run_steal

    root, base = sets
    local = run_steal(from_dict({}, base + [f"output_dir={root / 'local'}",
                                            "ray.teacher_service=t-s3-local"]))
    from aspkd_ray.cache import publish
    from aspkd_ray.layout import victim_location

    work = root / "never-written"
    cfg = from_dict({}, base + [f"output_dir={work}", f"storage.root={s3_root}",
                                f"cache_dir={s3_root}-cache", "ray.teacher_service=t-s3"])
    # The same victim, in a cache on the bucket: the S3 run reads nothing from local disk.
    publish(victim_location(from_dict({}, base)), victim_location(cfg), "model.json")
    local_files = _files(root)
    remote = run_steal(cfg)
    assert not work.exists()  # nothing of the run on local disk (temp files aside)
    assert _files(root) == local_files  # the local cache and run untouched
    objects = _objects(s3_root)
    for name in ("summary.json", "agreement.png", "mlflow.db", "proxy/_manifest.json",
                 "ledger/meta.json"):
        assert name in objects, name
    assert any(k.startswith("ray_train/attack/") for k in objects)
    assert any(k.startswith("mlflow-artifacts/") for k in objects)
    # The same attack: same proxy ids and images, same labels bought, same student.
    a, b = load_proxy_set(root / "local" / "proxy"), load_proxy_set(f"{s3_root}/proxy")
    assert list(a.ids) == list(b.ids) and (a.images == b.images).all()
    assert _charged(str(root / "local" / "ledger")) == _charged(f"{s3_root}/ledger")
    assert remote["agreement"] == local["agreement"]
    assert remote["calls_used"] == local["calls_used"] == 20
    saved = json.loads(storage.read_bytes(*storage.resolve(f"{s3_root}/summary.json")))
    assert saved["agreement"] == remote["agreement"] and saved["output_dir"] == s3_root
    # Rerun: resumes from the round checkpoints in the bucket, buys nothing new.
    again = run_steal(cfg)
    assert again["agreement"] == remote["agreement"]
    assert _charged(f"{s3_root}/ledger") == _charged(str(root / "local" / "ledger"))
    assert not work.exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_trial_sweep_on_s3(ray_session, sets, s3_root, tmp_path):
    from aspkd_ray.sweep.tune import load_sweep, run_sweep
    from aspkd_ray.teacher import Ledger

    root, base = sets
    data = from_dict({}, base)  # the same small settings, as a sweep's base file
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({
        "cache_dir": data.cache_dir,
        "generator": {"kind": "plugin", "plugin": data.generator.plugin, "batch_size": 50},
        "proxy": {"per_class": 12}, "budget": {"calls_per_class": 1},
        "victim": {"training": {"max_epochs": 1}},
        "training": {"max_epochs": 1, "patience": 1}, "storage": {"root": s3_root}}))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({
        "base": "base.yaml",
        "sweep": {"space": {"aspkd.sigma": {"grid": [0.5, 2.0]}}, "max_concurrent_trials": 1},
    }))
    work = tmp_path / "never-written"
    rows = run_sweep(load_sweep(tmp_path / "sweep.yaml"), work)
    assert len(rows) == 2 and all(r["error"] is None for r in rows)
    assert all(r["calls_used"] == 10 for r in rows)
    assert not work.exists()
    status = Ledger(f"{s3_root}/ledger", create=False).status()
    validation = status["trial_spent"]["sweep-validation"]  # the attacker objective's labels
    assert set(status["trial_spent"]) == {"sweep-validation", *(r["trial"] for r in rows)}
    assert 10 + validation <= status["spent"] <= 20 + validation
    objects = _objects(s3_root)
    assert {"sweep.json", "sweep_results.json", "sweep_results.md", "sweep.png", "best.yaml",
            "mlflow.db"} <= set(objects)
    assert any(k.startswith("ray_tune/") for k in objects)
    trials = {k.split("/")[1] for k in objects if k.startswith("trials/")}
    assert trials == {r["trial"] for r in rows}
    assert all(any(k.startswith(f"trials/{t}/ray_train/attack/checkpoint_") for k in objects)
               for t in trials)
