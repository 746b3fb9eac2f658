"""The proxy set on object storage (moto's S3 on 127.0.0.1): generator actors write their own
shards there, resume repairs it, the store reads it as it reads a local folder, and a
multi-node cluster that loses a node mid-generation still ends with the same set."""

from __future__ import annotations

import json
import os
import textwrap

import numpy as np
import pytest
from multinode import run_cluster_script

from aspkd_ray import storage
from aspkd_ray.config import from_dict
from aspkd_ray.generation import generate_proxy, load_proxy_set, make_plan
from aspkd_ray.generation.store import (
    ProxyCorrupt,
    ProxyMissing,
    check_files,
    open_dir,
    read_table,
    shard_names,
)

pytestmark = pytest.mark.timeout(300)

# The fastest generator: seeded noise around a class-dependent grey, no model to load.
# ASPKD_PLUGIN_SLEEP_S slows each batch down (the multi-node test needs a run that lasts).
PLUGIN = textwrap.dedent('''
    import os, time
    import numpy as np

    def make(config, class_names, device):
        pause = float(os.environ.get("ASPKD_PLUGIN_SLEEP_S", "0"))
        def generate(prompts, class_ids, seeds):
            time.sleep(pause)
            out = []
            for c, s in zip(class_ids, seeds):
                rng = np.random.default_rng(s)
                img = np.full((28, 28), 20.0 * c) + rng.normal(0, 30, (28, 28))
                out.append(np.clip(img, 0, 255).astype(np.uint8))
            return out
        return generate
''')
SHARD = 4
TOTAL = 22  # 6 shards, the last one short
COLUMNS = ["sample_id", "class_id", "class_name", "split", "seed", "png"]


def _data(tmp_path, total: int = TOTAL, **extra) -> dict:
    plugin = tmp_path / "plugin.py"
    if not plugin.exists():
        plugin.write_text(PLUGIN)
    return {"seed": 5, "cache_dir": str(tmp_path / "cache"), "output_dir": str(tmp_path / "out"),
            "generator": {"kind": "plugin", "plugin": f"{plugin}:make", "batch_size": 2},
            "proxy": {"per_class": None, "total": total, "val_fraction": 0.2}, **extra}


def _cfg(tmp_path, **kw):
    return from_dict(_data(tmp_path, **kw))


def _table(proxy: str) -> dict:
    return read_table(proxy, columns=COLUMNS).to_pydict()


def _objects(uri: str) -> list[str]:
    fs, path = storage.resolve(uri)
    return storage.list_files(fs, path)


def test_s3_generation_through_ray_equals_local(ray_session, s3_root, tmp_path):
    cfg = _cfg(tmp_path)
    manifest = generate_proxy(cfg, s3_root, shard_size=SHARD)
    proxy = f"{s3_root}/proxy"
    assert _objects(proxy) == ["_manifest.json", "_plan.json"] + [
        f"part-{k:05d}.parquet" for k in range(6)]  # no temporary objects
    # Nothing of the run went to this machine's disk: the driver got metadata rows only.
    assert sorted(os.listdir(tmp_path)) == ["plugin.py"]
    assert manifest["num_samples"] == TOTAL and manifest["run"]["generated"] == TOTAL

    local = generate_proxy(cfg, tmp_path / "local", shard_size=SHARD, executor="local")
    remote, here = _table(proxy), _table(str(tmp_path / "local" / "proxy"))
    assert remote["sample_id"] == here["sample_id"]
    assert len(set(remote["sample_id"])) == TOTAL
    for col in COLUMNS[1:]:
        assert remote[col] == here[col], col  # the PNGs byte for byte
    assert sorted(remote["sample_id"]) == sorted(make_plan(cfg, shard_size=SHARD)
                                                 .sample_id.tolist())
    strip = lambda m: {k: v for k, v in m.items() if k != "run"}  # noqa: E731
    assert strip(manifest) == strip(local)


def test_s3_resume_repairs_deleted_and_garbage_shards(ray_session, s3_root, tmp_path):
    cfg = _cfg(tmp_path)
    generate_proxy(cfg, s3_root, shard_size=SHARD)
    proxy = f"{s3_root}/proxy"
    before = _table(proxy)
    fs, path = storage.resolve(proxy)
    fs.delete_file(f"{path}/part-00001.parquet")
    storage.write_bytes(fs, f"{path}/part-00003.parquet", b"not a parquet file " * 20)
    with pytest.raises(ProxyCorrupt, match="part-00001.parquet is missing"):
        load_proxy_set(proxy)

    resumed = generate_proxy(cfg, s3_root)  # the shard size comes from _plan.json
    assert resumed["run"]["generated"] == 2 * SHARD  # shards 1 and 3 only
    after = _table(proxy)
    assert after == before
    ids = after["sample_id"]
    assert len(ids) == len(set(ids)) == TOTAL  # no duplicate, no gap
    assert check_files(proxy)["num_shards"] == 6


def test_store_reads_s3_like_local(s3_root, tmp_path):
    cfg = _cfg(tmp_path)
    generate_proxy(cfg, s3_root, shard_size=SHARD, executor="local")
    generate_proxy(cfg, tmp_path / "local", shard_size=SHARD, executor="local")
    proxy, local = f"{s3_root}/proxy", tmp_path / "local" / "proxy"

    a, b = load_proxy_set(proxy), load_proxy_set(local)
    for field in ("ids", "classes", "split", "images", "prompts", "seeds"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    assert a.class_names == b.class_names and a.images.shape == (TOTAL, 28, 28, 1)
    strip = lambda m: {k: v for k, v in m.items() if k != "run"}  # noqa: E731
    assert strip(check_files(proxy)) == strip(check_files(local))
    assert shard_names(proxy) == shard_names(local)

    fs, path = storage.resolve(proxy)
    fs.delete_file(f"{path}/part-00002.parquet")
    for check in (check_files, load_proxy_set):
        with pytest.raises(ProxyMissing) as exc:
            check(proxy)
        msg = str(exc.value)
        assert f"{proxy}/part-00002.parquet is missing" in msg and "aspkd generate" in msg
    fs.delete_file(f"{path}/_manifest.json")
    with pytest.raises(ProxyMissing, match=f"{proxy}/_manifest.json not found"):
        load_proxy_set(proxy)
    assert open_dir(proxy).show() == proxy  # messages name the URI, not the bucket path


_NODE_LOSS = r"""
import json, os, sys, threading, time
import aspkd_ray  # first: it sets Ray's auth mode before ray is imported
import ray
from ray.cluster_utils import Cluster

from aspkd_ray.config import from_dict
from aspkd_ray.generation import generate_proxy
from aspkd_ray.generation.store import open_dir, shard_names, shard_writer

uri, data, shard = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
os.environ["ASPKD_PLUGIN_SLEEP_S"] = "0.6"  # inherited by the nodes started below
# The head runs no work (0 CPUs): every actor is on a worker node that can be removed.
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
cluster.wait_for_nodes()
ray.init(address=cluster.address, namespace="multinode-generation")
proxy = open_dir(f"{uri}/proxy")
result = {"errors": []}


def remove_a_writer():
    # As soon as the first shard is in storage, remove the node that wrote it (an actor is
    # at work there on its next shard).
    while not shard_names(proxy):
        time.sleep(0.05)
    first = shard_names(proxy)[0]
    writer = shard_writer(proxy.at(first))
    node = next(n for n in nodes if n.node_id == writer)
    result["shards_before_removal"] = len(shard_names(proxy))
    cluster.remove_node(node)
    result["removed"] = writer


threading.Thread(target=remove_a_writer, daemon=True).start()
cfg = from_dict(data)
t0 = time.monotonic()
for attempt in range(3):  # Ray Data restarts the lost actor; a rerun resumes if it cannot
    try:
        manifest = generate_proxy(cfg, uri, shard_size=shard)
        break
    except Exception as exc:
        result["errors"].append(f"{type(exc).__name__}: {str(exc)[:300]}")
else:
    raise SystemExit("generation failed three times: " + " | ".join(result["errors"]))
result["seconds"] = time.monotonic() - t0
result["attempts"] = attempt + 1
result["writers"] = {n: shard_writer(proxy.at(n)) for n in shard_names(proxy)}
result["nodes"] = [n.node_id for n in nodes]
print("RESULT " + json.dumps(result))
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_multinode_generation_survives_a_lost_node(s3_root, tmp_path):
    # Two actors of 0.4 CPU each: one per 1-CPU node while both live (Ray Data spreads
    # actors), and both fit on the node that is left once one is removed.
    total = 40  # 10 shards of 4, ~1.2 s each
    data = _data(tmp_path, total=total, ray={"generation_actors": 2, "cpus_per_worker": 0.4})
    r = run_cluster_script(_NODE_LOSS, s3_root, json.dumps(data), str(SHARD))
    assert r.get("removed") in r["nodes"], r  # a node was removed while generating
    assert r["shards_before_removal"] < total // SHARD, r
    assert len(r["writers"]) == total // SHARD
    # Actors ran on more than one node: the removed node wrote the first shard (a retried
    # task may have written that shard again on the other node since), the other the rest.
    assert len(set(r["writers"].values()) | {r["removed"]}) >= 2, r

    cfg = _cfg(tmp_path, total=total)
    generate_proxy(cfg, tmp_path / "clean", shard_size=SHARD, executor="local")
    remote = _table(f"{s3_root}/proxy")
    assert len(remote["sample_id"]) == len(set(remote["sample_id"])) == total
    assert remote == _table(str(tmp_path / "clean" / "proxy"))  # ids and PNGs
    assert check_files(f"{s3_root}/proxy")["num_samples"] == total
    print(f"generation with a node lost: {r['seconds']:.1f} s, {r['attempts']} attempt(s), "
          f"writer nodes {sorted(set(r['writers'].values()))}, errors {r['errors']}")


def test_show_proxy_reads_the_storage_root_and_draws_locally(s3_root, tmp_path):
    from PIL import Image

    from aspkd_ray.cli.main import main

    generate_proxy(_cfg(tmp_path), s3_root, shard_size=SHARD, executor="local")
    out = tmp_path / "out"
    assert main(["show-proxy", "--set", f"storage.root={s3_root}", "--output-dir", str(out),
                 "--per-class", "1"]) == 0
    with Image.open(out / "proxy_grid.png") as img:  # on this machine, not in the bucket
        assert img.size[1] > 10 * 28
    assert not [n for n in _objects(s3_root) if n.endswith(".png")]
