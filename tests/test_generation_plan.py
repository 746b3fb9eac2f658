"""The sample plan, the Parquet contract, generator folders and pool sizing: no Ray, no model."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from aspkd_ray.config import from_dict
from aspkd_ray.generation import SCHEMA, generator_dir, generator_id, make_plan, plan_pool
from aspkd_ray.generation.backends import to_victim_format
from aspkd_ray.generation.plugin import load_factory

NAMES = tuple("zero one two three four five six seven eight nine".split())


def _cfg(**proxy):
    return from_dict({"seed": 3, "cache_dir": "/tmp/aspkd-test-cache",
                      "proxy": {"per_class": 20, **proxy}})


def test_parquet_schema_is_the_contract():
    expected = [("sample_id", pa.string()), ("class_id", pa.int64()),
                ("class_name", pa.string()), ("prompt", pa.string()), ("seed", pa.int64()),
                ("generator", pa.string()), ("png", pa.binary()), ("split", pa.string())]
    assert [(f.name, f.type) for f in SCHEMA] == expected


def test_plan_is_deterministic_and_ids_are_unique():
    a, b = make_plan(_cfg()), make_plan(_cfg())
    assert a.sample_id.tolist() == b.sample_id.tolist()
    assert a.seed.tolist() == b.seed.tolist() and a.prompt.tolist() == b.prompt.tolist()
    assert len(set(a.sample_id.tolist())) == len(a) == 200
    assert a.seed.dtype == np.int64 and (a.seed >= 0).all()


def test_ids_change_with_seed_and_generator_settings():
    base = set(make_plan(_cfg()).sample_id.tolist())
    other_seed = make_plan(from_dict({"seed": 4, "proxy": {"per_class": 20}}))
    assert not base & set(other_seed.sample_id.tolist())
    more_steps = from_dict({"seed": 3, "cache_dir": "/tmp/aspkd-test-cache",
                            "generator": {"steps": 50}, "proxy": {"per_class": 20}})
    assert generator_id(more_steps) != generator_id(_cfg())
    assert not base & set(make_plan(more_steps).sample_id.tolist())


def test_balanced_plan_has_exact_counts_and_validation_share():
    plan = make_plan(_cfg(val_fraction=0.15))
    assert np.bincount(plan.class_id, minlength=10).tolist() == [20] * 10
    for c in range(10):
        assert ((plan.class_id == c) & (plan.split == "val")).sum() == 3  # round(0.15 x 20)
    assert set(plan.split.tolist()) == {"train", "val"}
    for i in range(10):
        assert plan.prompt[i] in (f"An image of a {NAMES[plan.class_id[i]]}",
                                  f"A photo of a {NAMES[plan.class_id[i]]}")


def test_uniform_plan_draws_classes_and_templates():
    plan = make_plan(from_dict({"proxy": {"per_class": None, "total": 2000,
                                          "balanced": False}}))
    counts = np.bincount(plan.class_id, minlength=10)
    assert len(plan) == 2000 and counts.min() > 150 and counts.max() < 250
    assert counts.tolist() != [200] * 10  # drawn, not round-robin
    assert (plan.split == "val").sum() == 300  # 15% overall, stratified by class
    for c in range(10):
        assert abs(((plan.class_id == c) & (plan.split == "val")).sum() - 0.15 * counts[c]) < 1
    first = np.char.startswith(plan.prompt.astype(str), "An image").mean()
    assert 0.45 < first < 0.55


def test_sample_i_does_not_depend_on_the_set_size():
    small, big = make_plan(_cfg(per_class=10)), make_plan(_cfg(per_class=30))
    assert big.sample_id[:100].tolist() == small.sample_id.tolist()


def test_shards_cover_the_plan_once():
    plan = make_plan(_cfg(), shard_size=64)
    covered = np.concatenate([plan.index[plan.shard_slice(k)] for k in range(plan.num_shards)])
    assert covered.tolist() == list(range(200)) and plan.num_shards == 4
    assert make_plan(_cfg()).shard_size % _cfg().generator.batch_size == 0


def test_default_shards_are_whole_batches_and_enough_to_share_out():
    # A shard is one actor's unit of work: a small set still gets several.
    small = make_plan(from_dict({"generator": {"batch_size": 128},
                                 "proxy": {"per_class": 20}}), NAMES)  # 200 images
    assert small.shard_size == 128 and small.num_shards == 2  # one batch per shard
    mid = make_plan(from_dict({"generator": {"batch_size": 16},
                               "proxy": {"per_class": 100}}), NAMES)
    assert mid.shard_size % 16 == 0 and mid.num_shards >= 8
    big = make_plan(from_dict({"generator": {"batch_size": 16},
                               "proxy": {"per_class": 1000}}), NAMES)
    assert big.shard_size == 512  # about 512 images once the set is large


def test_generator_dir_differs_per_scenario_and_honours_model(tmp_path):
    digits = from_dict({"cache_dir": str(tmp_path)})
    xdomain = from_dict({"cache_dir": str(tmp_path), "dataset": {"name": "digits-xdomain"}})
    assert generator_dir(digits) != generator_dir(xdomain)
    assert generator_dir(digits).parent == tmp_path / "digits"
    assert generator_dir(digits) == generator_dir(from_dict({"cache_dir": str(tmp_path),
                                                             "seed": 9}))
    longer = from_dict({"cache_dir": str(tmp_path), "generator": {"training": {"steps": 9}}})
    assert generator_dir(longer) != generator_dir(digits)
    mine = from_dict({"generator": {"model": str(tmp_path / "g")}})
    assert generator_dir(mine) == tmp_path / "g"


def test_to_victim_format_resizes_and_converts_channels():
    from PIL import Image

    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 0] = 255
    grey = to_victim_format([rgb, Image.fromarray(rgb)], 28, 1)
    assert grey.shape == (2, 28, 28, 1) and grey.dtype == np.uint8
    assert abs(int(grey[0, 5, 5, 0]) - 76) <= 1  # ITU-R 601 luma of pure red
    colour = to_victim_format([np.full((8, 8, 1), 200, np.uint8)], 16, 3)
    assert colour.shape == (1, 16, 16, 3) and (colour == 200).all()
    with pytest.raises(TypeError, match="uint8"):
        to_victim_format([np.zeros((8, 8), np.float32)], 16, 1)


def test_plugin_spec_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="package.module:factory"):
        load_factory("no_colon")
    with pytest.raises(ValueError, match="cannot import"):
        load_factory("surely_not_a_module_xyz:make")
    path = tmp_path / "gen.py"
    path.write_text("def make(config, class_names, device):\n    return None\n")
    assert load_factory(f"{path}:make").__name__ == "make"
    with pytest.raises(ValueError, match="no callable"):
        load_factory(f"{path}:missing")


def test_pool_is_sized_from_reported_resources(monkeypatch):
    import ray

    def fake(cluster, free, nodes):
        monkeypatch.setattr(ray, "cluster_resources", lambda: cluster)
        monkeypatch.setattr(ray, "available_resources", lambda: free)
        monkeypatch.setattr(ray, "nodes", lambda: [
            {"Alive": True, "Resources": c if isinstance(c, dict) else {"CPU": c}}
            for c in nodes])

    fake({"CPU": 2.0}, {"CPU": 2.0}, [2.0])
    pool = plan_pool(from_dict({}))
    # The small DDPM: single-threaded actors with fractional CPUs, room left for the driver
    # (two whole-CPU actors plus a Ray Data task deadlock on 2 CPUs).
    assert pool.num == 2 and pool.gpus == 0 and pool.num * pool.cpus <= 1.5
    sd = {"generator": {"kind": "diffusers", "model": "some/pipeline"}}
    pool = plan_pool(from_dict(sd))  # a large pipeline: one copy per node
    assert pool.num == 1 and 1 <= pool.cpus < 2
    fake({"CPU": 2.0}, {"CPU": 1.0}, [2.0])  # half the CPUs busy elsewhere
    assert plan_pool(from_dict({})).num * plan_pool(from_dict({})).cpus <= 0.5
    fake({"CPU": 64.0, "GPU": 4.0}, {"CPU": 64.0, "GPU": 4.0}, [{"CPU": 16.0, "GPU": 1.0}] * 4)
    pool = plan_pool(from_dict(sd))
    assert pool.num == 4 and pool.gpus == 1 and pool.cpus <= 16
    fake({"CPU": 64.0}, {"CPU": 64.0}, [16.0] * 4)
    pool = plan_pool(from_dict(sd))
    assert pool.num == 4 and pool.gpus == 0 and 15 <= pool.cpus <= 16
    assert plan_pool(from_dict({})).num == 64
    assert plan_pool(from_dict({"ray": {"generation_actors": 2}})).num == 2
    # Unequal nodes: no actor asks for more CPUs than the smallest node has (it would wait
    # forever), unless ray.cpus_per_worker says so.
    fake({"CPU": 10.0}, {"CPU": 10.0}, [8.0, 1.0, 1.0])
    pool = plan_pool(from_dict(sd))
    assert pool.num == 3 and pool.cpus <= 1.0
    assert plan_pool(from_dict({**sd, "ray": {"cpus_per_worker": 2.0}})).cpus == 2.0
    # Actors no node can hold fail at once, naming the keys (not a wait without end).
    from aspkd_ray.runtime.resources import ResourceError

    fake({"CPU": 3.0}, {"CPU": 3.0}, [1.0, 1.0, 1.0])
    with pytest.raises(ResourceError, match="proxy generation.*ray.generation_actors"):
        plan_pool(from_dict({**sd, "ray": {"cpus_per_worker": 2.0}}))
