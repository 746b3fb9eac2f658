"""The class-conditional DDPM backend end to end: training (and its resume), Ray Data
generation to Parquet, determinism, resuming an interrupted run, the CLI and the grid."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from aspkd_ray.config import from_dict
from aspkd_ray.generation import (
    SCHEMA,
    generate_proxy,
    generator_dir,
    load_proxy_set,
    make_plan,
    train_generator,
)
from aspkd_ray.generation.ddpm import is_ready
from aspkd_ray.generation.store import read_table

pytestmark = pytest.mark.timeout(300)

TINY = {"resolution": 8, "steps": 3, "batch_size": 2,
        "training": {"steps": 4, "batch_size": 16, "block_channels": [8, 16],
                     "checkpoint_every": 2}}


def _cfg(cache, **extra):
    data = {"seed": 1, "cache_dir": str(cache), "generator": TINY,
            "proxy": {"per_class": None, "total": 10, "val_fraction": 0.2}}
    data.update(extra)
    return from_dict(data)


@pytest.fixture(scope="module")
def tiny_generator(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    folder = train_generator(_cfg(cache), progress=False)
    return cache, folder


def test_generator_is_saved_in_diffusers_format(tiny_generator):
    from diffusers import DDPMPipeline

    _, folder = tiny_generator
    assert is_ready(folder)
    pipe = DDPMPipeline.from_pretrained(folder)
    assert pipe.unet.config.num_class_embeds == 10 and pipe.unet.config.sample_size == 8
    info = json.loads((folder / "aspkd_generator.json").read_text())
    assert info["complete"] and info["class_names"][3] == "three"


def test_interrupted_training_resumes_to_the_same_weights(tmp_path, tiny_generator):
    _, straight = tiny_generator
    cfg = _cfg(tmp_path)
    folder = train_generator(cfg, progress=False, max_steps=2)
    assert not is_ready(folder) and (folder / "checkpoint" / "state.pt").is_file()
    assert train_generator(cfg, progress=False) == folder == generator_dir(cfg)
    assert is_ready(folder) and not (folder / "checkpoint").exists()
    from safetensors.torch import load_file

    a = load_file(straight / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def _rows(out):
    t = read_table(out / "proxy")
    return t.column("sample_id").to_pylist(), t.column("png").to_pylist()


@pytest.mark.slow
def test_ray_generation_end_to_end_deterministic_and_resumable(ray_session, tiny_generator,
                                                               tmp_path):
    cache, _ = tiny_generator
    cfg = _cfg(cache)
    out = tmp_path / "a"
    manifest = generate_proxy(cfg, out, shard_size=4)
    proxy = out / "proxy"
    files = sorted(p.name for p in proxy.glob("part-*.parquet"))
    assert files == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert pq.read_schema(proxy / files[0]).equals(SCHEMA)
    assert manifest["num_samples"] == 10 and manifest["splits"] == {"train": 8, "val": 2}
    assert sum(manifest["per_class"].values()) == 10
    assert json.loads((proxy / "_manifest.json").read_text())["config_hash"] == \
        manifest["config_hash"]

    ps = load_proxy_set(proxy)
    plan = make_plan(cfg, shard_size=4)
    assert len(ps) == 10 and ps.ids.tolist() == sorted(plan.sample_id.tolist())
    assert ps.images.shape == (10, 28, 28, 1) and ps.images.dtype == np.uint8
    assert ps.classes.dtype == np.int64 and ps.seeds.dtype == np.int64
    assert set(ps.split.tolist()) == {"train", "val"} and ps.class_names[0] == "zero"
    by_id = dict(zip(plan.sample_id.tolist(), plan.class_id.tolist(), strict=True))
    assert [by_id[i] for i in ps.ids] == ps.classes.tolist()
    ids, pngs = _rows(out)

    # The same config, run again elsewhere, in a plain loop without Ray: the same ids and
    # byte-identical images.
    generate_proxy(cfg, tmp_path / "b", shard_size=4, executor="local")
    assert _rows(tmp_path / "b") == (ids, pngs)

    # An interrupted run: one shard never written, another cut mid-write, no manifest.
    (proxy / "part-00001.parquet").unlink()
    (proxy / "part-00002.parquet").rename(proxy / "part-00002.parquet.tmp")
    (proxy / "_manifest.json").unlink()
    resumed = generate_proxy(cfg, out)
    assert resumed["run"]["generated"] == 6  # shards 1 and 2 only
    assert _rows(out) == (ids, pngs)
    assert len(set(_rows(out)[0])) == 10
    assert not list(proxy.glob("*.tmp"))

    # A finished set is returned as is (wherever proxy.dir points from); another config
    # never mixes into it.
    assert generate_proxy(cfg, out)["config_hash"] == manifest["config_hash"]
    shared = _cfg(cache, proxy={"per_class": None, "total": 10, "val_fraction": 0.2,
                                "dir": str(out)})
    assert generate_proxy(shared, out)["config_hash"] == manifest["config_hash"]
    with pytest.raises(ValueError, match="another config"):
        generate_proxy(_cfg(cache, seed=2), out)


@pytest.mark.slow
def test_cli_generate_and_show_proxy(ray_session, tiny_generator, tmp_path):
    from PIL import Image

    from aspkd_ray.cli.main import main

    cache, _ = tiny_generator
    common = ["--set", f"cache_dir={cache}", "--set", "generator.resolution=8",
              "--set", "generator.steps=2", "--set", "generator.training.steps=4",
              "--set", "generator.training.batch_size=16",
              "--set", "generator.training.block_channels=[8, 16]",
              "--set", "proxy.per_class=2", "--output-dir", str(tmp_path)]
    assert main(["generate", *common]) == 0
    ps = load_proxy_set(tmp_path / "proxy")
    assert np.bincount(ps.classes).tolist() == [2] * 10
    out = tmp_path / "grid.png"
    assert main(["show-proxy", *common, "--per-class", "2", "--out", str(out)]) == 0
    with Image.open(out) as img:
        w, h = img.size
    assert h > 10 * 28 and w > 2 * 28  # ten rows of two upscaled samples
