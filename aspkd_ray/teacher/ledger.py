"""The durable, write-ahead budget ledger, on local disk or any pyarrow filesystem URI.

Layout under the ledger root (a folder, or e.g. s3://bucket/run/ledger):

    meta.json                       budget n, output mode, number of classes, victim
    reserved/<seq>-<rand>.parquet   id, cls, trial, charge, ts   durable BEFORE the victim call
                                                                 (or, in-process, its answer)
    answered/<seq>-<rand>.parquet   id, label, ts                written after a valid answer
    failed/<seq>-<rand>.parquet     id, error, ts                written when an answer fails

Segments are immutable: each write is a new small file (object stores cannot append), and a
local write goes to a temporary name, then is renamed, so a crash never leaves half a segment;
reservations are also fsynced (file and folder) before the victim is called. The state is rebuilt by replaying every segment in sequence order; the live
service applies the same records through the same code, so a rebuilt ledger equals the live
one. A `charge` row is the one and only charge of a sample; rows with charge=false grant an
already-bought sample to another trial for free. One service writes a ledger at a time.
"""

from __future__ import annotations

import io
import json
import os
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from aspkd_ray.teacher.errors import LedgerMismatch

KINDS = ("reserved", "answered", "failed")
META = "meta.json"
FORMAT = 1


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local folder or a pyarrow URI (s3://, gs://, hdfs://, file://)."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    return pafs.FileSystem.from_uri(uri)


def normalize_uri(uri: str) -> str:
    """Local paths made absolute (the service may run in another working directory)."""
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def read_meta(uri: str) -> dict | None:
    """The ledger's meta.json, or None when there is no ledger at `uri` yet."""
    fs, root = resolve(uri)
    path = f"{root}/{META}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


def check_meta(uri: str, meta: dict, **asked) -> None:
    """Raise LedgerMismatch when a setting asked for (not None) differs from the ledger's."""
    wrong = {k: (meta[k], v) for k, v in asked.items() if v is not None and meta[k] != v}
    if wrong:
        what = ", ".join(f"{k}={old!r} (asked {new!r})" for k, (old, new) in wrong.items())
        raise LedgerMismatch(f"ledger {uri} was created with {what}. A ledger belongs to one "
                             f"attack; point budget.ledger at a new folder to start another.")


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
    """Open (or create) the ledger at `uri`; state rebuilt from its segments."""

    def __init__(self, uri: str, *, budget: int | None = None, output: str | None = None,
                 num_classes: int | None = None, victim: str | None = None,
                 create: bool = True) -> None:
        self.uri = normalize_uri(uri)
        self.fs, self.root = resolve(self.uri)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.meta = self._open_meta(budget, output, num_classes, victim, create)
        self.budget = int(self.meta["budget"])
        self.output = self.meta["output"]
        self.num_classes = int(self.meta["num_classes"])
        self.state = LedgerState(self.output)
        self._lock = threading.Lock()  # status() may run beside a write (threaded actor)
        self._dirs: set[str] = set()
        self._seq = 0
        self._replay()

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
        self._write_bytes(f"{self.root}/{META}", json.dumps(meta, indent=2).encode())
        return meta

    # ---- replay -----------------------------------------------------------------------
    def _segments(self) -> list[tuple[int, str, str]]:
        found = []
        for kind in KINDS:
            sel = pafs.FileSelector(f"{self.root}/{kind}", allow_not_found=True)
            for info in self.fs.get_file_info(sel):
                name = info.base_name
                if info.type == pafs.FileType.File and name.endswith(".parquet"):
                    found.append((int(name.split("-", 1)[0]), name, kind))
        return sorted(found)

    def _replay(self) -> None:
        for seq, name, kind in self._segments():
            table = pq.read_table(f"{self.root}/{kind}/{name}", filesystem=self.fs)
            self._apply(kind, table)
            self._seq = max(self._seq, seq + 1)

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
        buf = io.BytesIO()
        pq.write_table(table, buf)
        name = f"{self._seq:012d}-{uuid.uuid4().hex[:8]}.parquet"
        if kind not in self._dirs:
            self.fs.create_dir(f"{self.root}/{kind}", recursive=True)
            self._dirs.add(kind)
        self._write_bytes(f"{self.root}/{kind}/{name}", buf.getvalue(), sync)
        self._seq += 1
        # Only after the segment is durable does the in-memory state move.
        with self._lock:
            self._apply(kind, table)

    def _write_bytes(self, path: str, data: bytes, sync: bool = True) -> None:
        """Atomic write. `sync`: also survive power loss (fsync the file and the folder).

        Reservations are synced: they are what keeps the cap exact. Answers are not: one
        lost to power loss leaves its sample reserved-unanswered, still charged, and the
        next request for it asks the victim again at no charge. A killed process loses
        nothing either way (the OS has the data).
        """
        if self.local:
            tmp = f"{path}.{uuid.uuid4().hex[:6]}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
                if sync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic: readers never see half a segment
            if sync:
                fd = os.open(os.path.dirname(path), os.O_RDONLY)
                try:
                    os.fsync(fd)  # the rename itself
                finally:
                    os.close(fd)
        else:
            with self.fs.open_output_stream(path) as f:  # object PUTs are atomic
                f.write(data)

    # ---- reading ----------------------------------------------------------------------
    def status(self) -> dict:
        with self._lock:
            return self._status()

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
        tables = [pq.read_table(f"{self.root}/{kind}/{name}", filesystem=self.fs)
                  for _, name, kind in self._segments() if kind == "reserved"]
        if not tables:
            return pa.table({"id": pa.array([], pa.string()), "charge": pa.array([], pa.bool_())})
        return pa.concat_tables(tables)
