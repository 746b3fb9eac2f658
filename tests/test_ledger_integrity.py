"""One writer per ledger (its lease) and the ledger's integrity checks, without Ray."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from aspkd_ray import storage
from aspkd_ray.teacher.errors import LeaseLost, LedgerBusy, LedgerCorrupt, LedgerMismatch
from aspkd_ray.teacher.lease import Lease
from aspkd_ray.teacher.ledger import Ledger, read_meta


def _ledger(path: Path, writer: str = "w1", **kw) -> Ledger:
    return Ledger(str(path), budget=10, output="soft", num_classes=3, writer=writer, **kw)


def _fill(ledger: Ledger) -> None:
    probs = np.array([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]], np.float32)
    ledger.reserve(["a", "b"], [0, 1], ["", ""], [True, True])       # seq 0
    ledger.record_answers(["a", "b"], probs)                          # seq 1
    ledger.reserve(["c", "d", "e"], [2, 2, 0], ["", "", ""], [True] * 3)  # seq 2
    ledger.record_answers(["c", "d", "e"], np.eye(3, dtype=np.float32))  # seq 3


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "lease" not in p.parts}


def _segment(root: Path, kind: str, seq: int) -> Path:
    (path,) = (root / kind).glob(f"{seq:012d}-*.parquet")
    return path


# ---- one writer -------------------------------------------------------------------------

def test_second_writer_is_refused_naming_the_holder(tmp_path):
    first = _ledger(tmp_path / "l")
    with pytest.raises(LedgerBusy, match=r"held by another teacher service \(host .*pid "
                                         rf"{os.getpid()}"):
        _ledger(tmp_path / "l", writer="w2")
    first.reserve(["a"], [0], [""], [True])
    first.close()
    second = _ledger(tmp_path / "l", writer="w2")  # released: the next writer may take it
    assert second.status()["spent"] == 1
    second.close()


def test_readers_take_no_lease_and_cannot_write(tmp_path):
    writer = _ledger(tmp_path / "l")
    _fill(writer)
    reader = Ledger(str(tmp_path / "l"), create=False)
    assert reader.status()["spent"] == writer.status()["spent"] == 5
    with pytest.raises(PermissionError, match="read-only"):
        reader.reserve(["x"], [0], [""], [True])
    writer.close()


def test_same_key_takes_over_at_once(tmp_path):
    # A Ray actor restarted by Ray keeps its actor id: it must not wait for its own lease.
    _ledger(tmp_path / "l", writer="actor-1")  # never released (the actor crashed)
    again = _ledger(tmp_path / "l", writer="actor-1")
    again.reserve(["a"], [0], [""], [True])
    again.close()


def _hold_forever(path: str, ready) -> None:
    Ledger(path, budget=10, output="soft", num_classes=3, writer="child")
    ready.set()
    time.sleep(600)


def test_crashed_holder_on_this_machine_is_taken_over_at_once(tmp_path):
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    child = ctx.Process(target=_hold_forever, args=(str(tmp_path / "l"), ready))
    child.start()
    try:
        assert ready.wait(60)
        with pytest.raises(LedgerBusy, match="heartbeat"):
            _ledger(tmp_path / "l", writer="w2")  # alive: refused
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join()
    taker = _ledger(tmp_path / "l", writer="w2")  # its process is gone: taken at once
    assert taker.lease.previous["pid"] == child.pid
    taker.close()


def test_stale_heartbeat_is_taken_over_and_the_old_holder_is_fenced(tmp_path):
    fast = {"stale_s": 1.0, "heartbeat_s": 0.2}
    old = _ledger(tmp_path / "l", lease_options=fast)
    old.reserve(["a"], [0], [""], [True])
    old.lease._stop.set()          # the holder hangs: no more heartbeats (a paused node)
    old.lease._thread.join()
    rec = old.lease.holder()
    rec["host"] = "elsewhere"      # not this machine: only the heartbeat's age counts
    storage.write_bytes(old.fs, f"{old.lease.folder}/{old.lease._name()}",
                        __import__("json").dumps(rec).encode())
    with pytest.raises(LedgerBusy):
        _ledger(tmp_path / "l", writer="w2", lease_options=fast)
    time.sleep(1.3)
    new = _ledger(tmp_path / "l", writer="w2", lease_options=fast)
    new.reserve(["b"], [1], [""], [True])
    with pytest.raises(LeaseLost):
        old.reserve(["c"], [2], [""], [True])  # it never writes after the takeover
    assert Ledger(str(tmp_path / "l"), create=False).status()["spent"] == 2
    new.close()


def test_contenders_never_both_win(tmp_path):
    # Many writers race for one free ledger: exactly one holds it, the rest are refused.
    ctx = mp.get_context("spawn")
    _ledger(tmp_path / "l").close()
    with ctx.Pool(6) as pool:
        won = pool.map(_try_take, [(str(tmp_path / "l"), f"k{i}") for i in range(6)])
    assert sum(won) == 1


def _try_take(args) -> bool:
    path, key = args
    try:
        Ledger(path, budget=10, output="soft", num_classes=3, writer=key)
    except LedgerBusy:
        return False
    time.sleep(2)  # hold it while the others try
    return True


def test_lost_storage_makes_the_writer_refuse(tmp_path):
    led = _ledger(tmp_path / "l", lease_options={"stale_s": 1.0, "heartbeat_s": 0.2})
    led.lease._renewed -= 5.0  # no renewal got through for 5 s
    with pytest.raises(LeaseLost, match="could not renew"):
        led.reserve(["a"], [0], [""], [True])
    assert led.status()["spent"] == 0


# ---- integrity --------------------------------------------------------------------------

@pytest.fixture
def filled(tmp_path) -> Path:
    led = _ledger(tmp_path / "l")
    _fill(led)
    led.close()
    return tmp_path / "l"


def test_a_clean_ledger_reopens(filled):
    assert Ledger(str(filled), create=False).status()["spent"] == 5


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip_byte"])
def test_damaged_segment_is_named(filled, damage):
    path = _segment(filled, "reserved", 2)
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"not parquet at all",
                      "flip_byte": data[:40] + bytes([data[40] ^ 1]) + data[41:]}[damage])
    before = _snapshot(filled)
    with pytest.raises(LedgerCorrupt, match=rf"{path.name} is corrupt"):
        Ledger(str(filled), create=False)
    with pytest.raises(LedgerCorrupt):
        _ledger(filled, writer="w9")
    assert _snapshot(filled) == before  # nothing rewritten


def test_deleted_reserved_segment_is_found_not_undercounted(filled):
    _segment(filled, "reserved", 2).unlink()
    with pytest.raises(LedgerCorrupt, match="000000000002 are missing"):
        Ledger(str(filled), create=False)


def test_deleted_last_segment_is_found_through_the_lease_record(filled):
    _segment(filled, "answered", 3).unlink()
    with pytest.raises(LedgerCorrupt, match="recorded 4 segments.*1 segment"):
        Ledger(str(filled), create=False)


def test_answers_without_reservation_are_found(tmp_path):
    led = _ledger(tmp_path / "l")
    led.reserve(["a"], [0], [""], [True])
    led.record_answers(["a"], np.array([[1, 0, 0]], np.float32))
    led.close()
    # Replace the reservation with one for another sample: same seq, valid checksum.
    res = _segment(tmp_path / "l", "reserved", 0)
    res.unlink()
    other = _ledger(tmp_path / "m")
    other.reserve(["zz"], [0], [""], [True])
    other.close()
    moved = _segment(tmp_path / "m", "reserved", 0)
    moved.rename(tmp_path / "l" / "reserved" / moved.name)
    with pytest.raises(LedgerCorrupt, match="no charge .e.g. 'a'.*reserved/ segment is missing"):
        Ledger(str(tmp_path / "l"), create=False)


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'{"format": 2, "budget": "x"}'])
def test_garbage_meta_is_named(filled, content):
    (filled / "meta.json").write_bytes(content)
    with pytest.raises(LedgerCorrupt, match="meta.json"):
        read_meta(str(filled))
    with pytest.raises(LedgerCorrupt, match="meta.json"):
        Ledger(str(filled), create=False)


def test_mismatch_still_names_the_setting(filled):
    with pytest.raises(LedgerMismatch, match="budget=10 .asked 80."):
        Ledger(str(filled), budget=80, output="soft", num_classes=3)


def test_lease_holder_record(filled):
    rec = Lease(*storage.resolve(str(filled))).holder()
    assert rec["released"] and rec["segments"] == 4 and rec["pid"] == os.getpid()


def test_a_holder_known_dead_is_taken_over_without_waiting(tmp_path):
    import json

    old = _ledger(tmp_path / "l")
    old.lease._stop.set()
    old.lease._thread.join()
    rec = {**old.lease.holder(), "host": "elsewhere", "ray": "10.0.0.1:6379"}
    storage.write_bytes(old.fs, f"{old.lease.folder}/{old.lease._name()}",
                        json.dumps(rec).encode())
    with pytest.raises(LedgerBusy):  # fresh heartbeat on another host: live as far as we know
        _ledger(tmp_path / "l", writer="w2")
    seen = []
    taker = _ledger(tmp_path / "l", writer="w3",
                    lease_options={"gone": lambda r: seen.append(r["key"]) or True})
    assert seen == ["w1"] and taker.lease.previous["ray"] == "10.0.0.1:6379"
    taker.close()


def test_readers_beside_a_busy_writer_never_see_false_corruption(tmp_path):
    import threading

    led = Ledger(str(tmp_path / "l"), budget=400, output="soft", num_classes=3, writer="w",
                 lease_options={"stale_s": 2.0, "heartbeat_s": 0.05})
    seen, errors = [], []

    def write() -> None:
        for k in range(400):  # a charge and its answer, as fast as it can
            led.reserve([f"s{k}"], [0], [""], [True])
            led.record_answers([f"s{k}"], np.array([[1, 0, 0]], np.float32))

    writer = threading.Thread(target=write)
    writer.start()
    try:
        while writer.is_alive():
            try:
                seen.append(Ledger(str(tmp_path / "l"), create=False).status()["spent"])
            except LedgerCorrupt as exc:
                errors.append(str(exc))
    finally:
        writer.join()
        led.close()
    assert errors == [] and len(seen) > 5 and seen == sorted(seen)
    assert Ledger(str(tmp_path / "l"), create=False).status()["spent"] == 400


def test_a_reader_retries_a_listing_caught_mid_write(filled, monkeypatch):
    # What a reader may list while a service writes: answered seq 3 seen, reserved seq 2 not.
    real, calls = Ledger._segments, []

    def mid_write(self):
        calls.append(1)
        found = real(self)
        return [f for f in found if f[0] != 2] if len(calls) == 1 else found

    monkeypatch.setattr(Ledger, "_segments", mid_write)
    assert Ledger(str(filled), create=False).status()["spent"] == 5 and len(calls) == 2
    calls.clear()
    with pytest.raises(LedgerCorrupt, match="missing"):  # a writer has no one to race with
        _ledger(filled, writer="w2")
