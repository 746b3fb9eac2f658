"""The durable, write-ahead budget ledger, on local disk or any pyarrow filesystem URI.

Layout under the ledger root (a folder, or e.g. s3://bucket/run/ledger):

    meta.json                              budget n, output mode, number of classes, victim
    reserved/<seq>-<rand>-<sha>.parquet    id, cls, trial, charge, ts   durable BEFORE the
                                           victim call (or, in-process, its answer is used)
    answered/<seq>-<rand>-<sha>.parquet    id, label, ts   written after a valid answer
    failed/<seq>-<rand>-<sha>.parquet      id, error, ts   written when an answer fails
    lease/                                 who writes the ledger now (teacher/lease.py)

Segments are immutable: each write is a new small file (object stores cannot append), written
atomically (a local temporary name then a rename; an object PUT), so a crash never leaves half
a segment; reservations are also fsynced (file and folder) before the victim is called. The
state is rebuilt by replaying every segment in sequence order; the live service applies the
same records through the same code, so a rebuilt ledger equals the live one. A `charge` row is
the one and only charge of a sample; rows with charge=false grant an already-bought sample to
another trial for free.

Integrity: `<sha>` is the start of the segment's SHA-256, and sequence numbers run 0, 1, 2, …
over all kinds, so a truncated, garbage or deleted segment is found at open (deleted trailing
segments through the count the writer keeps in its lease file), as are answers without a
reservation. A ledger that fails a check is never used (LedgerCorrupt names the files): a
missing reservation would lower the spent count and let the attack buy past its budget.

One writer: a service opens the ledger with `writer=` and holds its lease while it writes; a
second writer is refused (LedgerBusy). Readers (`aspkd budget`, reports) take no lease.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from aspkd_ray import storage
from aspkd_ray.teacher.errors import LedgerCorrupt, LedgerMismatch
from aspkd_ray.teacher.lease import Lease

KINDS = ("reserved", "answered", "failed")
META = "meta.json"
READ_ATTEMPTS = 4     # a reader's tries before a failed check is corruption, not a race
FORMAT = 2            # 2: segment names carry a checksum; 1 (read only): they do not
META_KEYS = {"format": int, "budget": int, "output": str, "num_classes": int}
COLUMNS = {"reserved": ("id", "cls", "trial", "charge"), "answered": ("id", "label"),
           "failed": ("id", "error")}
CORRUPT_HINT = ("A corrupt ledger is never used: it could undercount what was spent. Restore "
                "the file(s) from a copy, or keep this ledger for the record and start a new "
                "attack with another output folder or budget.ledger.")


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local folder or a pyarrow URI (s3://, gs://, hdfs://, file://)."""
    return storage.resolve(uri)


def normalize_uri(uri: str) -> str:
    """Local paths made absolute (the service may run in another working directory)."""
    return storage.normalize(uri)


def read_meta(uri: str) -> dict | None:
    """The ledger's meta.json (checked), or None when there is no ledger at `uri` yet."""
    fs, root = resolve(uri)
    path = f"{root}/{META}"
    if not storage.exists(fs, path):
        return None
    try:
        meta = json.loads(storage.read_bytes(fs, path).decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise LedgerCorrupt(f"{path} is not valid JSON ({exc}). {CORRUPT_HINT}") from None
    if not isinstance(meta, dict):
        raise LedgerCorrupt(f"{path} holds a {type(meta).__name__}, not the ledger's "
                            f"settings. {CORRUPT_HINT}")
    for key, kind in META_KEYS.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise LedgerCorrupt(f"{path}: {key!r} is {meta.get(key)!r}, expected a "
                                f"{kind.__name__}. {CORRUPT_HINT}")
    if meta["format"] not in (1, FORMAT) or meta["output"] not in ("soft", "hard"):
        raise LedgerCorrupt(f"{path}: format {meta['format']!r} / output {meta['output']!r} "
                            f"is not a ledger this version reads (format 1 or {FORMAT}, "
                            f"output soft or hard). {CORRUPT_HINT}")
    return meta


def check_meta(uri: str, meta: dict, **asked) -> None:
    """Raise LedgerMismatch when a setting asked for (not None) differs from the ledger's."""
    wrong = {k: (meta[k], v) for k, v in asked.items() if v is not None and meta[k] != v}
    if wrong:
        what = ", ".join(f"{k}={old!r} (asked {new!r})" for k, (old, new) in wrong.items())
        raise LedgerMismatch(f"ledger {uri} was created with {what}. A ledger belongs to one "
                             f"attack; point budget.ledger at a new folder to start another.")


def segment_name(seq: int, data: bytes) -> str:
    return f"{seq:012d}-{uuid.uuid4().hex[:8]}-{hashlib.sha256(data).hexdigest()[:16]}.parquet"


@dataclass
class LedgerState:
    """What the ledger says; updated only through the apply_* methods."""

    output: str
    charged: dict[str, int] = field(default_factory=dict)       # id -> class, charge order
    trial_grants: dict[str, set[str]] = field(default_factory=dict)
    answers: dict[str, np.ndarray | int] = field(default_factory=dict)
    failed_attempts: int = 0
    last_error: str | None = None

    def apply_reserve(self, ids: list[str], classes: list[int], trials: list[str],
                      charges: list[bool]) -> None:
        for i, c, t, charge in zip(ids, classes, trials, charges, strict=True):
            if charge and i not in self.charged:
                self.charged[i] = int(c)
            if t:
                self.trial_grants.setdefault(t, set()).add(i)

    def apply_answers(self, ids: list[str], labels: np.ndarray) -> None:
        for i, lab in zip(ids, labels, strict=True):
            self.answers[i] = int(lab) if self.output == "hard" else np.asarray(lab, np.float32)

    def apply_failure(self, ids: list[str], error: str) -> None:
        self.failed_attempts += 1
        self.last_error = error

    def unanswered(self) -> list[str]:
        return [i for i in self.charged if i not in self.answers]


class Ledger:
    """Open (or create) the ledger at `uri`; state rebuilt from its segments and checked.

    `writer`: a key naming this writer (e.g. the service's Ray actor id): the ledger's lease
    is taken (LedgerBusy when another writer holds it) and held until `close()`. Without it
    the ledger is read-only. `lease_options` go to `Lease` (stale_s, heartbeat_s, info).
    """

    def __init__(self, uri: str, *, budget: int | None = None, output: str | None = None,
                 num_classes: int | None = None, victim: str | None = None,
                 create: bool = True, writer: str | None = None,
                 lease_options: dict | None = None) -> None:
        self.uri = normalize_uri(uri)
        self.fs, self.root = resolve(self.uri)
        self.local = storage.is_local(self.fs)
        self.meta = self._open_meta(budget, output, num_classes, victim, create)
        self.budget = int(self.meta["budget"])
        self.output = self.meta["output"]
        self.num_classes = int(self.meta["num_classes"])
        self.state = LedgerState(self.output)
        self._lock = threading.Lock()  # status() may run beside a write (threaded actor)
        self._write_lock = threading.Lock()
        self._dirs: set[str] = set()
        self._seq = 0
        self.lease: Lease | None = None
        if writer is not None:  # nobody else writes while we replay and after
            self.lease = Lease(self.fs, self.root, key=writer, label=self.uri,
                               **(lease_options or {}))
            self.lease.acquire()
        try:
            self._replay_checked()
        except Exception:
            self.close()
            raise

    def _replay_checked(self) -> None:
        """Replay; a reader retries a failed check a few times first. A service writing
        while a reader lists reserved/, answered/ and failed/ one after the other can show it
        a gap or an answer whose reservation it listed too early; real damage stays."""
        attempts = 1 if self.lease is not None else READ_ATTEMPTS
        for attempt in range(attempts):
            try:
                self._replay()
                return
            except LedgerCorrupt:
                if attempt == attempts - 1:
                    raise
                self.state, self._seq = LedgerState(self.output), 0
                time.sleep(0.2 * (attempt + 1))

    # ---- meta -------------------------------------------------------------------------
    def _open_meta(self, budget, output, num_classes, victim, create) -> dict:
        meta = read_meta(self.uri)
        if meta is not None:
            check_meta(self.uri, meta, budget=budget, output=output, num_classes=num_classes)
            return meta
        if not create:
            raise FileNotFoundError(f"no ledger at {self.uri} (no {META}); pass the ledger "
                                    f"folder or URI the attack used (budget.ledger).")
        if budget is None or output is None or num_classes is None:
            raise ValueError("creating a ledger needs budget, output and num_classes.")
        if output not in ("soft", "hard"):
            raise ValueError(f"output must be 'soft' or 'hard', got {output!r}.")
        if budget < 0 or num_classes < 1:
            raise ValueError(f"budget must be >= 0 and num_classes >= 1, got {budget}, "
                             f"{num_classes}.")
        meta = {"format": FORMAT, "budget": int(budget), "output": output,
                "num_classes": int(num_classes), "victim": victim, "created": time.time()}
        self.fs.create_dir(self.root, recursive=True)
        storage.write_bytes(self.fs, f"{self.root}/{META}", json.dumps(meta, indent=2).encode(),
                            sync=True)
        return meta

    # ---- replay and checks ------------------------------------------------------------
    def _segments(self) -> list[tuple[int, str, str]]:
        """(seq, name, kind) of every segment, in sequence order; names checked."""
        found = []
        for kind in KINDS:
            for name in storage.list_files(self.fs, f"{self.root}/{kind}"):
                if not name.endswith(".parquet"):
                    continue  # a local write's temporary file, never renamed: not a segment
                parts = name[:-len(".parquet")].split("-")
                if (len(parts) not in (2, 3) or not parts[0].isdigit()
                        or (len(parts) == 2 and self.meta["format"] != 1)):
                    raise LedgerCorrupt(f"{self.root}/{kind}/{name} is not a ledger segment "
                                        f"name (expected <seq>-<rand>-<sha256>.parquet). "
                                        f"{CORRUPT_HINT}")
                found.append((int(parts[0]), name, kind))
        return sorted(found)

    def _read_segment(self, kind: str, name: str) -> pa.Table:
        path = f"{self.root}/{kind}/{name}"
        data = storage.read_bytes(self.fs, path)
        parts = name[:-len(".parquet")].split("-")
        if len(parts) == 3 and hashlib.sha256(data).hexdigest()[:16] != parts[2]:
            raise LedgerCorrupt(f"{path} is corrupt: its checksum does not match its content "
                                f"({len(data)} bytes; truncated or overwritten). {CORRUPT_HINT}")
        try:
            table = pq.read_table(pa.BufferReader(data))
        except (pa.ArrowException, OSError) as exc:
            raise LedgerCorrupt(f"{path} is corrupt: not a readable Parquet file ({exc}). "
                                f"{CORRUPT_HINT}") from None
        missing = [c for c in COLUMNS[kind] if c not in table.column_names]
        if missing:
            raise LedgerCorrupt(f"{path} is corrupt: columns {missing} are missing. "
                                f"{CORRUPT_HINT}")
        return table

    def _replay(self) -> None:
        # The count the writer recorded is read before the listing: segments only grow, so
        # a live writer can never make the listing look shorter than the record.
        recorded = self.lease.previous_segments if self.lease is not None else \
            Lease(self.fs, self.root).max_segments()
        segments = self._segments()
        seqs = [seq for seq, _, _ in segments]
        if seqs != list(range(len(seqs))):
            have = set(seqs)
            gaps = [i for i in range(max(seqs) + 1) if i not in have][:5]
            dups = sorted({s for s in seqs if seqs.count(s) > 1})[:5]
            what = (f"segments {', '.join(f'{g:012d}' for g in gaps)} are missing" if gaps
                    else f"sequence numbers {dups} appear twice")
            raise LedgerCorrupt(f"ledger {self.uri}: {what} (segment files under reserved/, "
                                f"answered/ and failed/ are numbered 0, 1, 2, ... with no gap). "
                                f"{CORRUPT_HINT}")
        if recorded > len(seqs):
            raise LedgerCorrupt(f"ledger {self.uri}: its writer recorded {recorded} segments "
                                f"in lease/, but {len(seqs)} are there: the last "
                                f"{recorded - len(seqs)} segment(s) are missing. {CORRUPT_HINT}")
        for seq, name, kind in segments:
            table = self._read_segment(kind, name)
            self._check_reserved(kind, name, table)
            self._apply(kind, table)
            self._seq = seq + 1

    def _check_reserved(self, kind: str, name: str, table: pa.Table) -> None:
        """Answers, failures and free grants only for charged samples: else a reservation is
        missing, and the spent count would be too low."""
        ids = table.column("id").to_pylist()
        if kind == "reserved":
            charges = table.column("charge").to_pylist()
            ids = [i for i, c in zip(ids, charges, strict=True) if not c]
        orphans = [i for i in dict.fromkeys(ids) if i not in self.state.charged]
        if orphans:
            raise LedgerCorrupt(f"{self.root}/{kind}/{name}: {len(orphans)} sample(s) have "
                                f"{'grants' if kind == 'reserved' else kind + ' rows'} but no "
                                f"charge (e.g. {orphans[0]!r}): a reserved/ segment is missing "
                                f"or was altered. {CORRUPT_HINT}")

    def _apply(self, kind: str, table: pa.Table) -> None:
        ids = table.column("id").to_pylist()
        if kind == "reserved":
            self.state.apply_reserve(ids, table.column("cls").to_pylist(),
                                     table.column("trial").to_pylist(),
                                     table.column("charge").to_pylist())
        elif kind == "answered":
            col = table.column("label").combine_chunks()
            if self.output == "soft":
                labels = col.flatten().to_numpy().reshape(len(ids), -1)
            else:
                labels = col.to_numpy()
            self.state.apply_answers(ids, labels)
        else:
            errors = table.column("error").to_pylist()
            self.state.apply_failure(ids, errors[0] if errors else "")

    # ---- writes -----------------------------------------------------------------------
    def reserve(self, ids: list[str], classes: list[int], trials: list[str],
                charges: list[bool]) -> None:
        """Write-ahead: record charges (and free trial grants) before the victim is called."""
        if not ids:
            return
        table = pa.table({"id": pa.array(ids, pa.string()),
                          "cls": pa.array(classes, pa.int32()),
                          "trial": pa.array(trials, pa.string()),
                          "charge": pa.array(charges, pa.bool_()),
                          "ts": pa.array([time.time()] * len(ids), pa.float64())})
        self._write_segment("reserved", table, sync=True)

    def record_answers(self, ids: list[str], labels: np.ndarray) -> None:
        """Record checked answers (float32 N x C soft, int64 N hard)."""
        if not ids:
            return
        if self.output == "soft":
            flat = pa.array(np.ascontiguousarray(labels, np.float32).ravel())
            label = pa.FixedSizeListArray.from_arrays(flat, labels.shape[1])
        else:
            label = pa.array(np.asarray(labels, np.int64))
        table = pa.table({"id": pa.array(ids, pa.string()), "label": label,
                          "ts": pa.array([time.time()] * len(ids), pa.float64())})
        self._write_segment("answered", table)

    def record_failure(self, ids: list[str], error: str) -> None:
        """Record that charged samples got no valid answer (they stay reserved-unanswered)."""
        table = pa.table({"id": pa.array(ids, pa.string()),
                          "error": pa.array([error] * len(ids), pa.string()),
                          "ts": pa.array([time.time()] * len(ids), pa.float64())})
        self._write_segment("failed", table)

    def _write_segment(self, kind: str, table: pa.Table, sync: bool = False) -> None:
        """Reservations are synced: they are what keeps the cap exact. Answers are not: one
        lost to power loss leaves its sample reserved-unanswered, still charged, and the
        next request for it asks the victim again at no charge. A killed process loses
        nothing either way (the OS has the data)."""
        if self.lease is None:
            raise PermissionError(f"ledger {self.uri} was opened read-only; a writer opens it "
                                  f"with writer=<key> (and holds its lease).")
        buf = io.BytesIO()
        pq.write_table(table, buf)
        data = buf.getvalue()
        with self._write_lock:
            self.lease.check()  # fencing: never write after another service took over
            if kind not in self._dirs:
                self.fs.create_dir(f"{self.root}/{kind}", recursive=True)
                self._dirs.add(kind)
            storage.write_bytes(self.fs, f"{self.root}/{kind}/{segment_name(self._seq, data)}",
                                data, sync=sync)
            self._seq += 1
            self.lease.note_segments(self._seq)
        # Only after the segment is durable does the in-memory state move.
        with self._lock:
            self._apply(kind, table)

    def close(self) -> None:
        """Release the lease (a writer's); the files stay."""
        if self.lease is not None:
            self.lease.release()
            self.lease = None

    # ---- reading ----------------------------------------------------------------------
    def status(self) -> dict:
        with self._lock:
            return self._status()

    def holder(self) -> dict | None:
        """The lease file of the service writing (or last to write) this ledger."""
        return Lease(self.fs, self.root).holder()

    def _status(self) -> dict:
        s = self.state
        return {
            "budget": self.budget,
            "spent": len(s.charged),
            "left": self.budget - len(s.charged),
            "per_class": dict(sorted(Counter(s.charged.values()).items())),
            "output": self.output,
            "num_classes": self.num_classes,
            "answered": len(s.answers),
            "reserved_unanswered": s.unanswered(),
            "trial_spent": {t: len(v) for t, v in sorted(s.trial_grants.items())},
            "failed_attempts": s.failed_attempts,
            "last_error": s.last_error,
            "ledger": self.uri,
        }

    def charge_rows(self) -> pa.Table:
        """Every reservation row ever written (for audits and tests)."""
        tables = [self._read_segment(kind, name)
                  for _, name, kind in self._segments() if kind == "reserved"]
        if not tables:
            return pa.table({"id": pa.array([], pa.string()), "charge": pa.array([], pa.bool_())})
        return pa.concat_tables(tables)
