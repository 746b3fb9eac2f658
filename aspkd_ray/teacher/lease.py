"""One writer per ledger: an exclusive lease kept beside the ledger, on any filesystem.

Two teacher services writing one ledger would each count only their own charges (measured:
two runs on one folder spent 153 of a budget of 80). So a service holds a lease while it
writes, and a second one is refused with the holder's name.

Files, under `<ledger>/lease/`:

    <epoch:010d>-<token>.json   owner (host, pid, key), heartbeat time and count, the
                                ledger's segment count, released flag

The holder is the single file of the highest epoch. The protocol needs only atomic writes
and list-after-write consistency (local disks, NFS, S3, GCS), no compare-and-swap:

- **acquire**: read the holder of the highest epoch e. If it is live and not ours, refuse
  (LedgerBusy). Otherwise write our file at epoch e+1, then list epoch e+1: alone, we hold
  the lease; another contender there, both step back (delete, random pause, retry). Of two
  contenders, whichever lists second sees the other, so at most one ever wins.
- **live** means: not released, and its heartbeat younger than `stale_s` (wall clocks of
  the nodes must agree within a few seconds, as NTP keeps them), unless the holder ran on
  this machine and its process is gone (a crash here is taken over at once). A holder with
  our `key` (the same Ray actor, restarted by Ray) is taken over at once.
- **heartbeat**: every `heartbeat_s` the holder rewrites its own file (nobody else writes
  it). If it cannot for `valid_s`, it stops writing the ledger (it may no longer hold it).
- **fencing**: before each ledger write, `check()` lists the lease folder: a higher epoch
  means another service took over, and this one refuses from then on (LeaseLost).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable

from aspkd_ray import storage
from aspkd_ray.teacher.errors import LeaseLost, LedgerBusy

log = logging.getLogger(__name__)

FOLDER = "lease"
STALE_S = 30.0       # a heartbeat older than this: the holder is gone
HEARTBEAT_S = 5.0
_NAME = re.compile(r"^(\d{10})-([0-9a-f]{12})\.json$")


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a reused pid apart)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _process_gone(holder: dict) -> bool:
    """The holder ran on this machine (same host, same boot) and its process is gone."""
    if holder.get("host") != socket.gethostname() or holder.get("boot_id") != _boot_id():
        return False
    pid = int(holder.get("pid", -1))
    if pid <= 0:
        return False
    ticks = _start_ticks(pid)
    return ticks is None or (holder.get("start_ticks") not in (None, ticks))


def describe_holder(holder: dict, now: float | None = None) -> str:
    age = (now or time.time()) - float(holder.get("heartbeat", 0.0))
    where = f"host {holder.get('host')}, pid {holder.get('pid')}"
    if holder.get("ray"):
        where += f", Ray {holder['ray']}"
    return (f"{where}, holding since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(float(holder.get('acquired', 0))))}"
            f", last heartbeat {age:.0f} s ago")


class Lease:
    """The write lease of the ledger at `root` (on filesystem `fs`).

    `key` identifies the writer across restarts (a Ray actor id): a holder with the same key
    is taken over at once. `info` adds fields to the lease file (e.g. the Ray cluster).
    `gone(record) -> bool` may say that a holder is known to be dead (e.g. Ray reports its
    actor DEAD), so it is taken over without waiting for its heartbeat to go stale.
    """

    def __init__(self, fs, root: str, *, key: str | None = None, info: dict | None = None,
                 stale_s: float = STALE_S, heartbeat_s: float = HEARTBEAT_S,
                 gone: Callable[[dict], bool] | None = None, label: str | None = None) -> None:
        if not 0 < heartbeat_s < stale_s / 2:
            raise ValueError(f"heartbeat_s must be in (0, stale_s / 2), got {heartbeat_s} "
                             f"with stale_s={stale_s}.")
        self.fs, self.folder = fs, f"{root}/{FOLDER}"
        self.label = label or root  # the ledger, as the user wrote it (for messages)
        self.key = key or uuid.uuid4().hex
        self.gone = gone
        self.info = dict(info or {})
        self.stale_s, self.heartbeat_s = float(stale_s), float(heartbeat_s)
        # A holder that could not renew for this long stops writing: a taker waits stale_s.
        self.valid_s = self.stale_s - 2 * self.heartbeat_s
        self.epoch: int | None = None
        self.previous: dict | None = None     # the holder we took over from, if any
        self.segments = 0                      # the ledger's segment count, kept in the file
        self.previous_segments = 0             # the most any earlier writer recorded
        self._token = uuid.uuid4().hex[:12]
        self._beat = 0
        self._renewed = 0.0                    # monotonic time of the last good write
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # ---- reading the folder -------------------------------------------------------------
    def _listing(self) -> dict[int, list[str]]:
        by_epoch: dict[int, list[str]] = {}
        for name in storage.list_files(self.fs, self.folder):
            m = _NAME.match(name)
            if m:
                by_epoch.setdefault(int(m.group(1)), []).append(name)
        return by_epoch

    def _read(self, name: str) -> dict | None:
        try:
            return json.loads(storage.read_bytes(self.fs, f"{self.folder}/{name}"))
        except (OSError, ValueError):
            return None  # being written, or just deleted by a contender stepping back

    def holder(self) -> dict | None:
        """The current holder's record (released or not), or None when there is none."""
        by_epoch = self._listing()
        if not by_epoch:
            return None
        top = max(by_epoch)
        if len(by_epoch[top]) != 1:
            return None  # contenders are settling it right now
        rec = self._read(by_epoch[top][0])
        return None if rec is None else {**rec, "epoch": top}

    def max_segments(self) -> int:
        """The largest ledger segment count any lease file recorded (0 when none)."""
        counts = [rec.get("segments", 0) for names in self._listing().values()
                  for n in names if (rec := self._read(n)) is not None]
        return max(counts, default=0)

    def is_live(self, rec: dict, now: float | None = None) -> bool:
        if rec.get("released") or rec.get("key") == self.key:
            return False
        if (now or time.time()) - float(rec.get("heartbeat", 0.0)) > self.stale_s:
            return False
        return not (_process_gone(rec) or (self.gone is not None and self.gone(rec)))

    # ---- taking and keeping it ----------------------------------------------------------
    def acquire(self, wait_s: float = 0.0) -> Lease:
        """Take the lease, or raise LedgerBusy naming the holder (after `wait_s` seconds of
        retrying, 0 = refuse at once). Starts the heartbeat."""
        deadline = time.monotonic() + wait_s
        settle_until = time.monotonic() + self.stale_s  # contenders that never clean up
        while True:
            by_epoch = self._listing()
            top = max(by_epoch, default=-1)
            contested = top >= 0 and len(by_epoch[top]) > 1
            rec = None if top < 0 or contested else self._read(by_epoch[top][0])
            busy = rec is not None and self.is_live(rec)
            if busy or (contested and time.monotonic() < settle_until):
                if busy and time.monotonic() >= deadline:
                    raise LedgerBusy(
                        f"the ledger {self.label} is held by another "
                        f"teacher service ({describe_holder(rec)}). One service writes a "
                        f"ledger at a time: wait for that run to end, connect to its Ray "
                        f"cluster, or use another output folder / budget.ledger. A crashed "
                        f"holder is taken over when its heartbeat is older than "
                        f"{self.stale_s:.0f} s.")
                time.sleep(random.uniform(0.05, 0.25) if contested else
                           min(self.heartbeat_s, max(deadline - time.monotonic(), 0.05)))
                continue
            epoch = top + 1
            self.epoch, self.previous = epoch, rec
            self._write()
            mine = self._listing().get(epoch, [])
            if mine == [self._name()]:
                break
            storage.delete(self.fs, f"{self.folder}/{self._name()}")  # step back, retry
            self.epoch = None
            time.sleep(random.uniform(0.05, 0.3))
        # What earlier writers recorded of the ledger, before their files are tidied away.
        self.previous_segments = self.max_segments()
        for old, names in self._listing().items():  # tidy: older epochs are history
            if old < epoch - 1:
                for n in names:
                    storage.delete(self.fs, f"{self.folder}/{n}")
        if rec is not None and not rec.get("released"):
            log.warning("took over the ledger lease from a holder that did not release it "
                        "(%s)", describe_holder(rec))
        self._thread = threading.Thread(target=self._heartbeat, name="ledger-lease",
                                        daemon=True)
        self._thread.start()
        return self

    def _name(self) -> str:
        return f"{self.epoch:010d}-{self._token}.json"

    def _write(self, released: bool = False) -> None:
        with self._lock:
            self._beat += 1
            now = time.time()
            rec = {"key": self.key, "host": socket.gethostname(), "boot_id": _boot_id(),
                   "pid": os.getpid(), "start_ticks": _start_ticks(os.getpid()),
                   "acquired": (self.info.get("acquired") or now), "heartbeat": now,
                   "beat": self._beat, "segments": self.segments, "released": released,
                   **{k: v for k, v in self.info.items() if k != "acquired"}}
            self.info.setdefault("acquired", rec["acquired"])
            storage.write_bytes(self.fs, f"{self.folder}/{self._name()}",
                                json.dumps(rec).encode())
            self._renewed = time.monotonic()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._write()
                self._check_epoch()
            except LeaseLost:
                return
            except Exception as exc:  # noqa: BLE001 - storage hiccups: check() decides
                log.warning("could not renew the ledger lease: %s", exc)

    def _check_epoch(self) -> None:
        newer = [e for e in self._listing() if e > (self.epoch or 0)]
        if newer:
            holder = self.holder() or {}
            self._lost = (f"another teacher service took over the ledger "
                          f"({describe_holder(holder) if holder else 'epoch ' + str(max(newer))})")
            raise LeaseLost(f"{self._lost}; this service stops answering so the budget stays "
                            f"exact. Reconnect to use the service that holds it.")

    def check(self) -> None:
        """Raise LeaseLost unless this writer still holds the lease (call before a write)."""
        if self._lost:
            raise LeaseLost(f"{self._lost}; this service no longer writes the ledger.")
        if self.epoch is None:
            raise LeaseLost("the ledger lease is not held (released or never acquired).")
        stale = time.monotonic() - self._renewed
        if stale > self.valid_s:
            raise LeaseLost(f"could not renew the ledger lease for {stale:.0f} s (storage "
                            f"unreachable?): another service may take the ledger over, so "
                            f"this one stops answering. It retries the renewal; check the "
                            f"storage behind the ledger.")
        self._check_epoch()

    def note_segments(self, count: int) -> None:
        """The ledger's segment count, written with the next heartbeat (detects deletions)."""
        self.segments = max(self.segments, int(count))

    def release(self) -> None:
        """Mark the lease released (with the final segment count) and stop the heartbeat."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat_s + 1)
        if self.epoch is not None and not self._lost:
            try:
                self._write(released=True)
            except Exception as exc:  # noqa: BLE001 - it goes stale instead
                log.warning("could not release the ledger lease: %s", exc)
        self.epoch = None
