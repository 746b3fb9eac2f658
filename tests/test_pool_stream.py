"""The streamed proxy pool (pool.mode=stream): it reads only the rows asked, computes the
same latents as the in-memory pool, trains on the same batches when a subset fits in
pool.memory_mb, streams a subset that does not, and a whole attack runs with a pool larger
than the memory cap while the driver never decodes the pool."""

import numpy as np
import pytest
import torch

from aspkd_ray.aspkd.rounds import ProxyPool
from aspkd_ray.config import TrainingConfig, from_dict
from aspkd_ray.datasets import to_tensor
from aspkd_ray.pool import PoolIndex, PoolTooLarge, StreamedPool, choose_mode, float_bytes

SIZE, CHANS = 28, 1


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    """A 3-class proxy set of class-coloured shapes, written with small shards."""
    from aspkd_ray.generation import generate_proxy

    root = tmp_path_factory.mktemp("pool")
    cfg = from_dict({}, [f"cache_dir={root / 'cache'}", "generator.kind=plugin",
                         "generator.plugin=aspkd_ray.generation.shapes:shapes",
                         "generator.resolution=32", "generator.batch_size=10",
                         "dataset.name=imagefolder", "dataset.image_size=28",
                         "dataset.channels=1", "proxy.per_class=40",
                         f"dataset.root={_image_folder(root)}"])
    generate_proxy(cfg, root, shard_size=10, executor="local")
    return str(root / "proxy")


def _image_folder(root):
    for name in ("circle", "square", "cross"):  # class names come from the folder names
        (root / "classes" / "train" / name).mkdir(parents=True, exist_ok=True)
    return root / "classes"


def _pools(proxy, memory_bytes=1 << 30):
    from aspkd_ray.generation import load_proxy_set

    index = PoolIndex.open(proxy)
    tr, va = index.positions("train"), index.positions("val")
    whole = load_proxy_set(proxy)
    x = to_tensor(whole.images, SIZE, CHANS)
    mem = ProxyPool(x[torch.as_tensor(tr)], whole.classes[tr], x[torch.as_tensor(va)],
                    whole.classes[va])
    streamed = StreamedPool(index, tr, va, SIZE, CHANS, memory_bytes=memory_bytes,
                            embed_batch=16, embed_actors=1)
    return whole, index, mem, streamed


def _student(seed=0):
    from aspkd_ray.models import create_model

    torch.manual_seed(seed)
    return create_model("digits_cnn_small", num_classes=3, in_chans=CHANS, image_size=SIZE)


def test_index_reads_only_asked_rows_in_order(proxy):
    whole, index, _, _ = _pools(proxy)
    assert list(index.ids) == list(whole.ids) and np.array_equal(index.classes, whole.classes)
    rows = np.array([17, 3, 99, 3, 0])
    assert np.array_equal(index.read_images(rows), whole.images[rows])
    assert len(index.shard_names) == 12  # 120 images, shards of 10
    # A process never decodes more than half of pool.memory_mb at once.
    streamed = StreamedPool(index, index.positions("train"), index.positions("val"), SIZE,
                            CHANS, memory_bytes=2 * index.stored_bytes(99))
    assert streamed._read(np.arange(99)).shape == (99, SIZE, SIZE, CHANS)
    with pytest.raises(PoolTooLarge, match="pool.memory_mb"):
        streamed._read(np.arange(100))


def test_decoded_images_are_kept_for_reuse_within_the_cap(proxy, monkeypatch):
    import aspkd_ray.pool.index as index_module

    _, index, _, _ = _pools(proxy)
    decoded = []
    real = index_module.png_decode
    monkeypatch.setattr(index_module, "png_decode", lambda b: decoded.append(1) or real(b))
    index.use_cache(index.stored_bytes(50))
    index.read_images(np.arange(40))
    index.read_images(np.arange(40))
    assert len(decoded) == 40  # the second read decoded nothing
    index.read_images(np.arange(40, 100))  # 60 more: the oldest are dropped
    assert index.cache.used <= index.stored_bytes(50) and len(index.cache.rows) == 50
    kept = np.asarray(list(index.cache.rows))
    decoded.clear()
    index.read_images(kept)
    assert decoded == []
    dropped = np.setdiff1d(np.arange(100), kept)
    index.read_images(dropped[:10])
    assert len(decoded) == 10


def test_auto_mode_streams_only_a_pool_over_the_cap():
    assert choose_mode("auto", 1000, 28, 1, memory_mb=1024) == "memory"
    assert choose_mode("auto", 100_000, 224, 3, memory_mb=1024) == "stream"  # 60 GB
    assert choose_mode("memory", 100_000, 224, 3, memory_mb=1) == "memory"
    assert choose_mode("stream", 10, 28, 1, memory_mb=1024) == "stream"


def test_a_subset_under_the_cap_trains_exactly_as_in_memory(proxy):
    _, _, mem, streamed = _pools(proxy)
    cfg = TrainingConfig(max_epochs=2, batch_size=16, early_stopping="none")
    idx = np.arange(0, len(mem.classes), 2)
    y = torch.as_tensor(mem.classes[idx])
    a, b = _student(), _student()
    torch.manual_seed(5)  # dropout draws from the global generator
    mem.fit(a, idx, y, cfg, seed=3)
    torch.manual_seed(5)
    streamed.fit(b, idx, y, cfg, seed=3)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    # and validation scores agree
    assert mem.validator(None)(a) == streamed.validator(None)(b)


def test_a_subset_over_the_cap_is_streamed_in_chunks_each_image_once_per_epoch(proxy):
    _, index, mem, _ = _pools(proxy)
    cap = 2 * float_bytes(25, SIZE, CHANS)  # chunks of 16 images (batch 16)
    streamed = StreamedPool(index, index.positions("train"), index.positions("val"), SIZE,
                            CHANS, memory_bytes=cap)
    reads = []
    real = index.read_images

    def spy(rows):
        reads.append(len(rows))
        return real(rows)

    index.read_images = spy
    idx = np.arange(len(mem.classes))
    y = torch.as_tensor(mem.classes)
    batches = streamed._streamed_batches(streamed.train_rows[idx], y, 16, seed=0, rank=0,
                                         world_size=1)
    seen = [yb for _, yb in batches(0)]
    assert sum(len(b) for b in seen) == len(idx)
    assert max(reads) <= 25  # never more decoded at once than the cap holds
    assert index.stored_bytes(len(idx)) > streamed.half  # so this fit streams
    # each image once, with its own target: the class counts match
    assert np.array_equal(np.bincount(torch.cat(seen).numpy(), minlength=3),
                          np.bincount(mem.classes, minlength=3))
    # two ranks: as many batches each, together covering the epoch
    r0 = list(streamed._streamed_batches(streamed.train_rows, y, 16, 0, 0, 2)(1))
    r1 = list(streamed._streamed_batches(streamed.train_rows, y, 16, 0, 1, 2)(1))
    assert len(r0) == len(r1) and sum(len(b[1]) for b in r0 + r1) >= len(idx)
    cfg = TrainingConfig(max_epochs=3, batch_size=16, early_stopping="none", lr=3e-3)
    res = streamed.fit(_student(), idx, y, cfg, seed=0)
    assert res.history[-1]["loss"] < res.history[0]["loss"]


@pytest.mark.timeout(300)
def test_latents_from_ray_data_actors_match_the_in_memory_pool(ray_session, proxy):
    _, _, mem, streamed = _pools(proxy)
    model = _student(1)
    want = mem.embed(model)
    got = streamed.embed(model)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(streamed.predict(model), mem.predict(model))
    np.testing.assert_allclose(streamed.predict_proba(model), mem.predict_proba(model),
                               rtol=1e-4, atol=1e-6)
    streamed.latents_dtype = "float16"
    half = streamed.embed(model)
    assert half.dtype == np.float16
    np.testing.assert_allclose(half.astype(np.float32), want, rtol=1e-2, atol=1e-2)
    # and in the worker's own process, a chunk at a time, through the cache
    streamed.latents_dtype, streamed.embed_actors = "float32", 0
    streamed.memory_bytes = 2 * float_bytes(30, SIZE, CHANS)
    assert streamed.embed_here()
    np.testing.assert_allclose(streamed.embed(model), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(streamed.predict(model), mem.predict(model))
    np.testing.assert_allclose(streamed.predict_proba(model), mem.predict_proba(model),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(600)
def test_steal_runs_with_a_pool_over_the_memory_cap_never_decoding_it(ray_session, tmp_path,
                                                                     monkeypatch):
    """Done-when test: the pool (800 images, 2.5 MB as float32, 0.6 MB as stored) is larger
    than pool.memory_mb (1 MB, half of it for decoded images kept): the driver may not decode
    it (load_proxy_set fails here), every read in the workers refuses more than half the cap,
    latents come from Ray Data actors and the fits on the whole pool stream."""
    from test_steal import PLUGIN  # the tests folder is on sys.path (pytest rootdir)

    from aspkd_ray.generation import store
    from aspkd_ray.jobs.steal import run_steal
    from aspkd_ray.teacher import Ledger

    plugin = tmp_path / "digits_plugin.py"
    plugin.write_text(PLUGIN)
    cfg = from_dict({}, [
        f"cache_dir={tmp_path / 'cache'}", "generator.kind=plugin",
        f"generator.plugin={plugin}:make", "generator.batch_size=50", "proxy.per_class=80",
        "budget.calls_per_class=2", "victim.training.max_epochs=2",
        "training.max_epochs=1", "student.pretrain=proxy_prompts",
        "training.early_stopping=bought_val", "training.bought_val_per_class=1",
        "budget.calls_per_class=4", "pool.mode=auto", "pool.memory_mb=1",
        f"output_dir={tmp_path / 'out'}", "ray.teacher_service=t-pool-stream"])

    def refuse(*a, **k):
        raise AssertionError("the driver decoded the whole proxy pool")

    # Generation, the victim and the proxy set first (outside the guard), then the attack.
    from aspkd_ray.jobs.steal import ensure_proxy, ensure_victim
    ensure_victim(cfg)
    ensure_proxy(cfg)
    monkeypatch.setattr(store, "load_proxy_set", refuse)
    monkeypatch.setattr("aspkd_ray.generation.load_proxy_set", refuse)
    summary = run_steal(cfg)
    assert summary["pool_mode"] == "stream"
    assert summary["calls_used"] == 40 == Ledger(str(tmp_path / "out" / "ledger"),
                                                 create=False).status()["spent"]
    assert len(summary["agreement_by_round"]) == 3
    assert 0 <= summary["agreement"] <= 100 and summary["pseudo_label_agreement"] is not None
