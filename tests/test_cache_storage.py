"""Caches on object storage: a victim (and a generator) trained with cache_dir=s3://… lands in
the bucket, is read back through a per-process mirror, and a half-published folder (its
marker missing) is never used."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from aspkd_ray import cache, storage
from aspkd_ray.config import from_dict

pytestmark = pytest.mark.timeout(300)

VICTIM = ["victim.training.max_epochs=1", "seed=3"]


def _files(location: str) -> list[str]:
    fs, path = storage.resolve(location)
    return storage.list_files(fs, path)


def _copy(src: str, dst: str, names: list[str]) -> None:
    fs, a = storage.resolve(src)
    _, b = storage.resolve(dst)
    for name in names:
        storage.write_bytes(fs, f"{b}/{name}", storage.read_bytes(fs, f"{a}/{name}"))


@pytest.fixture(scope="module")
def s3_victim(s3_server, tmp_path_factory):
    """A tiny digits victim trained into a bucket, and the same one trained locally."""
    import boto3

    from aspkd_ray.layout import victim_location
    from aspkd_ray.victim import train_victim

    bucket = "aspkd-cache-victim"
    boto3.client("s3").create_bucket(Bucket=bucket)
    cfg = from_dict({}, VICTIM + [f"cache_dir=s3://{bucket}/cache"])
    local = from_dict({}, VICTIM + [f"cache_dir={tmp_path_factory.mktemp('local')}"])
    work = tmp_path_factory.mktemp("cwd")
    old = os.getcwd()
    os.chdir(work)  # a local cache would show up here (Path("s3://b/c") is "s3:/b/c")
    try:
        summary = train_victim(cfg, progress=False)
    finally:
        os.chdir(old)
    assert list(work.iterdir()) == []
    train_victim(local, progress=False)
    return cfg, local, summary, victim_location(cfg)


def test_victim_is_published_to_the_bucket(s3_victim, tmp_path, monkeypatch):
    from aspkd_ray.jobs.steal import check_victim
    from aspkd_ray.victim.train import victim_ready

    cfg, _, summary, location = s3_victim
    assert location.startswith("s3://aspkd-cache-victim/cache/digits/victim-")
    assert summary["checkpoint"] == location
    assert {"model.json", "model.safetensors", "summary.json"} <= set(_files(location))
    assert victim_ready(location) and not check_victim(cfg)
    # Read from another working directory: nothing local is needed or made.
    monkeypatch.chdir(tmp_path)
    assert not check_victim(cfg)
    assert list(tmp_path.iterdir()) == []


def test_a_fresh_mirror_answers_like_the_local_victim(s3_victim):
    from aspkd_ray.datasets import load_victim_data
    from aspkd_ray.evaluation.oracle import EvaluationOracle
    from aspkd_ray.teacher.victims import make_victim, victim_input, victim_name

    cfg, local, _, location = s3_victim
    cache.forget()  # as in a new process (a teacher actor on another node)
    images = load_victim_data("digits", "test").images[:64]
    remote = make_victim(cfg, 10)
    mirror = cache.local_copy(location)  # the one make_victim downloaded: not fetched again
    assert (mirror / "model.json").is_file() and mirror.name == location.rsplit("/", 1)[-1]
    assert remote.name == victim_name(cfg) == f"local:{location}"
    x = victim_input(images, cfg)
    np.testing.assert_allclose(remote.predict(x), make_victim(local, 10).predict(x),
                               rtol=1e-5, atol=1e-6)
    oracle = EvaluationOracle(cfg)
    assert oracle.num_classes == 10
    np.testing.assert_array_equal(oracle.predict_classes(images),
                                  EvaluationOracle(local).predict_classes(images))


def test_a_half_published_victim_is_not_used(s3_victim):
    from aspkd_ray.jobs.steal import check_victim
    from aspkd_ray.teacher.victims import make_victim
    from aspkd_ray.victim.train import VictimMissing, victim_ready

    cfg, _, _, location = s3_victim
    half = "s3://aspkd-cache-victim/half/victim"
    _copy(location, half, ["model.safetensors", "summary.json"])  # marker (model.json) missing
    broken = from_dict({}, VICTIM + [f"victim.checkpoint={half}"])
    assert not victim_ready(half)
    with pytest.raises(VictimMissing, match="holds no victim checkpoint"):
        check_victim(broken)
    with pytest.raises(FileNotFoundError, match="model.json"):
        make_victim(broken, 10)
    with pytest.raises(FileNotFoundError, match="partly published"):
        cache.local_copy(half, "model.json")
    assert not cache.mirror_path(half).exists()
    with pytest.raises(VictimMissing, match="does not exist"):
        check_victim(from_dict({}, VICTIM + ["victim.checkpoint=s3://aspkd-cache-victim/no"]))


def test_an_interrupted_download_leaves_no_mirror(s3_victim, monkeypatch):
    cfg, _, _, location = s3_victim
    cache.forget()
    real = storage.read_bytes
    calls = []

    def flaky(fs, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("connection reset")
        return real(fs, path)

    monkeypatch.setattr(storage, "read_bytes", flaky)
    with pytest.raises(OSError, match="connection reset"):
        cache.local_copy(location, "model.json")
    assert not cache.mirror_path(location).exists()
    assert not any(p.name.endswith(".part") for p in cache.mirror_path(location).parents[1]
                   .iterdir())
    monkeypatch.setattr(storage, "read_bytes", real)
    mirror = cache.local_copy(location, "model.json")
    assert sorted(p.name for p in mirror.iterdir()) == _files(location)


def test_publish_writes_the_marker_last(tmp_path, s3_server, monkeypatch):
    import boto3

    boto3.client("s3").create_bucket(Bucket="aspkd-cache-publish")
    (tmp_path / "sub").mkdir()
    for name in ("b.bin", "model.json", "sub/c.bin", "a.bin"):
        (tmp_path / name).write_text(name)
    order = []
    real = storage.write_bytes

    def record(fs, path, data, **kw):
        order.append(path.rsplit("/", 1)[-1])
        real(fs, path, data, **kw)

    monkeypatch.setattr(storage, "write_bytes", record)
    cache.publish(tmp_path, "s3://aspkd-cache-publish/x", marker="model.json")
    assert order[-1] == "model.json" and sorted(order) == ["a.bin", "b.bin", "c.bin",
                                                           "model.json"]
    assert cache.exists("s3://aspkd-cache-publish/x", "model.json")
    assert (cache.local_copy("s3://aspkd-cache-publish/x") / "sub" / "c.bin").read_text() \
        == "sub/c.bin"
    assert cache.local_copy(str(tmp_path)) == tmp_path  # a local path is itself


def test_generator_on_object_storage(s3_server, tmp_path, monkeypatch):
    import boto3

    from aspkd_ray.generation import generator_dir, generator_id, train_generator
    from aspkd_ray.generation.backends import build_generator
    from aspkd_ray.generation.ddpm import is_ready
    from aspkd_ray.generation.ray_generate import _resolved
    from aspkd_ray.generation.train_ddpm import generator_location

    boto3.client("s3").create_bucket(Bucket="aspkd-cache-gen")
    tiny = {"resolution": 8, "steps": 2, "batch_size": 2,
            "training": {"steps": 2, "batch_size": 8, "block_channels": [8, 16]}}
    cfg = from_dict({"seed": 1, "cache_dir": "s3://aspkd-cache-gen/cache", "generator": tiny})
    local = from_dict({"seed": 1, "cache_dir": str(tmp_path / "local"), "generator": tiny})
    location = generator_location(cfg)
    assert location.startswith("s3://aspkd-cache-gen/cache/digits/generator-")
    assert not is_ready(location) and not generator_dir(cfg).exists()
    with pytest.raises(Exception, match="no trained generator"):
        _resolved(cfg)
    folder = train_generator(cfg, progress=False)
    assert is_ready(location) and "model_index.json" in _files(location)
    info = json.loads(storage.read_bytes(*storage.resolve(f"{location}/aspkd_generator.json")))
    assert info["complete"]
    assert is_ready(folder) and folder.name == location.rsplit("/", 1)[-1]
    assert generator_id(cfg) == generator_id(local)  # same ids as a local cache
    assert _resolved(cfg).generator.model == location  # actors download their own copy
    cache.forget()  # as in a generation actor's process: it downloads its own mirror
    gen = build_generator(_resolved(cfg), tuple(str(i) for i in range(10)), device="cpu")
    assert gen.num_classes == 10 and len(gen(["x"] * 2, [0, 1], [5, 6])) == 2
    # Half-published: the marker is missing, so the folder is not a generator.
    half = "s3://aspkd-cache-gen/half/generator"
    _copy(location, half, ["aspkd_generator.json"])
    assert not is_ready(half)
    with pytest.raises(FileNotFoundError):
        from aspkd_ray.generation.ddpm import DDPMGenerator

        DDPMGenerator(half)
