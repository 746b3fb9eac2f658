"""The ledger, its lease and the teacher service on object storage (moto's S3 on 127.0.0.1)."""

from __future__ import annotations

import time

import numpy as np
import pyarrow.fs as pafs
import pytest

from aspkd_ray import storage
from aspkd_ray.teacher.errors import LeaseLost, LedgerBusy, LedgerCorrupt
from aspkd_ray.teacher.ledger import Ledger


def _open(uri: str, writer: str | None = "w1", **kw) -> Ledger:
    return Ledger(uri, budget=6, output="hard", num_classes=3, writer=writer, **kw)


def test_s3_ledger_one_writer_and_rebuild(s3_root):
    uri = f"{s3_root}/ledger"
    led = _open(uri)
    led.reserve(["a", "b"], [0, 1], ["", ""], [True, True])
    led.record_answers(["a", "b"], np.array([2, 1]))
    with pytest.raises(LedgerBusy, match=f"the ledger {uri} is held"):
        _open(uri, writer="w2")
    led.close()
    again = _open(uri, writer="w2")
    assert again.status()["spent"] == 2 and again.state.answers == {"a": 2, "b": 1}
    again.close()


def test_s3_damaged_or_missing_segment_is_found(s3_root):
    uri = f"{s3_root}/ledger"
    led = _open(uri)
    led.reserve(["a"], [0], [""], [True])
    led.reserve(["b"], [1], [""], [True])
    led.close()
    fs, root = storage.resolve(uri)
    first = f"{root}/reserved/{storage.list_files(fs, f'{root}/reserved')[0]}"
    data = storage.read_bytes(fs, first)
    storage.write_bytes(fs, first, data[:-20])
    with pytest.raises(LedgerCorrupt, match="is corrupt"):
        Ledger(uri, create=False)
    fs.delete_file(first)
    with pytest.raises(LedgerCorrupt, match="000000000000 are missing"):
        Ledger(uri, create=False)


def test_s3_takeover_after_stale_heartbeat_fences_the_old_writer(s3_root):
    import json

    uri, fast = f"{s3_root}/ledger", {"stale_s": 1.0, "heartbeat_s": 0.2}
    old = _open(uri, lease_options=fast)
    old.reserve(["a"], [0], [""], [True])
    old.lease._stop.set()
    old.lease._thread.join()
    rec = {**old.lease.holder(), "host": "another-node"}
    storage.write_bytes(old.fs, f"{old.lease.folder}/{old.lease._name()}",
                        json.dumps(rec).encode())
    time.sleep(1.3)
    new = _open(uri, writer="w2", lease_options=fast)
    new.reserve(["b"], [1], [""], [True])
    old.lease._renewed = time.monotonic()  # even a writer that thinks it is fresh is fenced
    with pytest.raises(LeaseLost, match="took over"):
        old.reserve(["c"], [2], [""], [True])
    new.close()
    assert Ledger(uri, create=False).status()["spent"] == 2


@pytest.mark.timeout(240)
def test_teacher_service_on_an_s3_ledger_survives_a_restart(ray_session, s3_root, tmp_path):
    """The service writes its ledger to S3; killed and restarted by Ray, it rebuilds the same
    budget from S3 and charges nothing twice."""
    import uuid

    import ray
    import torch

    from aspkd_ray.config import load
    from aspkd_ray.models import create_model, save_checkpoint
    from aspkd_ray.teacher import connect_teacher_service

    torch.manual_seed(0)
    ckpt = save_checkpoint(create_model("digits_cnn", num_classes=10, in_chans=1,
                                        image_size=28), tmp_path / "victim")
    uri = f"{s3_root}/ledger"
    cfg = load(None, [f"output_dir={tmp_path}", f"victim.checkpoint={ckpt}",
                      f"budget.ledger={uri}", f"ray.teacher_service=s3-{uuid.uuid4().hex[:6]}",
                      "ray.namespace=aspkd-teacher-tests"], None)
    client = connect_teacher_service(cfg, 10, budget=12)
    try:
        imgs = np.random.default_rng(0).integers(0, 256, (16, 28, 28, 1), dtype=np.uint8)
        ids = [f"s{i}" for i in range(16)]
        first = client.buy(ids[:8], np.arange(8) % 10, imgs[:8])
        pid = client.describe()["pid"]
        ray.kill(client._handle, no_restart=False)
        deadline = time.monotonic() + 120
        while True:
            try:
                if ray.get(client._handle.describe.remote())["pid"] != pid:
                    break
            except ray.exceptions.RayActorError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.5)
        assert client.status()["spent"] == 8
        np.testing.assert_array_equal(client.buy(ids[:8], np.arange(8) % 10, imgs[:8]), first)
        client.buy(ids[8:12], np.arange(8, 12) % 10, imgs[8:12])
        status = client.status()
        assert (status["spent"], status["left"]) == (12, 0)
    finally:
        client.shutdown()
    assert not (tmp_path / "ledger").exists()  # nothing of the ledger on local disk
    fs, root = storage.resolve(uri)
    names = [i.path for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))]
    assert any("/reserved/" in n for n in names) and any("/lease/" in n for n in names)
    rows = Ledger(uri, create=False).charge_rows().to_pydict()
    charged = [i for i, c in zip(rows["id"], rows["charge"], strict=True) if c]
    assert sorted(charged) == sorted(ids[:12])  # each charged once
