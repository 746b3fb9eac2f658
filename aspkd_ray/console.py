"""What a person sees in the terminal: one line per stage, progress bars, and how loud it is.

Three levels, set once by the command line (`aspkd -q | -v`):

- QUIET: warnings, errors and the final report only;
- NORMAL (default): stage lines ("victim: trained (24 s)") and progress bars on stderr; our
  INFO logs go to a driver log file in Ray's session log folder, and Ray's own output
  (worker logs, Ray Data progress, Ray Train chatter) stays in Ray's log files
  (runtime/ray_connect.py applies that side);
- VERBOSE: every log line on the console, and Ray's output as Ray prints it.

Stage lines and bars go to stderr, so stdout holds only a command's result (the report).
Bars are tqdm bars on a terminal; elsewhere (a pipe, a log file, CI) a bar prints a plain
line at each quarter of its total, and when it moves after a minute without a line (a long
stage, or one of unknown total), never a stream of carriage returns.
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

QUIET, NORMAL, VERBOSE = 0, 1, 2
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DRIVER_LOG = "aspkd-driver-{pid}.log"
PLAIN_EVERY_S = 60.0     # off a terminal: a bar that moves says so after this long
BUFFERED_RECORDS = 5000  # log records kept until the driver log file exists

_level = NORMAL
_lock = threading.RLock()  # stage lines and bars come from the main and poll threads
log = logging.getLogger(__name__)


def level() -> int:
    return _level


def verbose() -> bool:
    return _level >= VERBOSE


def configure(to: int) -> None:
    """Set the level and the logging it implies (idempotent: replaces what it set before).

    The root logger passes INFO; the console handler shows WARNING and up (INFO and up when
    verbose); every INFO record is also kept for the driver log file (`log_to_folder`)."""
    global _level
    _level = to
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_aspkd", False)]:
        root.removeHandler(handler)
    root.setLevel(logging.INFO)
    console = _StderrHandler()
    console.setLevel(logging.INFO if to >= VERBOSE else logging.WARNING)
    console.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
    for handler in (console, _DRIVER_LOG):
        handler._aspkd = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # CPU-feature probing noise


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at emit time (pytest's capture swaps it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _DriverLog(logging.Handler):
    """INFO records of this process: kept in memory until `log_to_folder` names the file
    (Ray's session folder exists only once Ray runs), then written there."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.pending: collections.deque[logging.LogRecord] = collections.deque(
            maxlen=BUFFERED_RECORDS)
        self.file: logging.FileHandler | None = None
        self.path: Path | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.file is None:
            self.pending.append(record)
        else:
            self.file.emit(record)

    def open(self, path: Path) -> None:
        with _lock:
            if self.file is not None:
                return
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = logging.FileHandler(path, encoding="utf-8")
            self.file.setFormatter(logging.Formatter(LOG_FORMAT))
            self.path = path
            while self.pending:
                self.file.emit(self.pending.popleft())

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        super().close()


_DRIVER_LOG = _DriverLog()


def log_to_folder(folder: str | Path) -> Path:
    """Write this process's log records (the ones so far too) to a file in `folder`."""
    import os

    _DRIVER_LOG.open(Path(folder) / DRIVER_LOG.format(pid=os.getpid()))
    return _DRIVER_LOG.path  # type: ignore[return-value]


def log_folder() -> Path | None:
    """The folder of the driver log file, once known (Ray's session log folder)."""
    return _DRIVER_LOG.path.parent if _DRIVER_LOG.path else None


def _terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def say(text: str) -> None:
    """One status line (not in quiet mode), above any bar being drawn."""
    if _level < NORMAL:
        return
    with _lock:
        if _terminal() and "tqdm" in sys.modules:
            from tqdm import tqdm

            tqdm.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)


def seconds(t: float) -> str:
    """A duration as a person reads it: 0.4 s, 24 s, 6 min 03 s."""
    if t < 10:
        return f"{t:.1f} s"
    if t < 600:
        return f"{t:.0f} s"
    return f"{int(t // 60)} min {int(t % 60):02d} s"


class Stage:
    """A stage being run; its line is printed when it ends (see `stage`)."""

    def __init__(self, name: str) -> None:
        self.name, self.t0 = name, time.monotonic()
        self.detail = "done"  # what it made: "trained", "2,000 images"
        self.note = ""        # said before the time: "(generated, 95 s)"
        self.elapsed: float | None = None  # set to report a time measured elsewhere

    def start(self, doing: str) -> None:
        """Say what a stage that may take a while is doing now ("training …")."""
        say(f"{self.name}: {doing} …")

    def seconds(self) -> float:
        return self.elapsed if self.elapsed is not None else time.monotonic() - self.t0


@contextmanager
def stage(name: str) -> Iterator[Stage]:
    """Run a stage and print `name: detail (note, time)` when it ends (`name: failed
    after …` when it raises; the error itself is the caller's to report)."""
    st = Stage(name)
    try:
        yield st
    except BaseException:
        say(f"{name}: failed after {seconds(time.monotonic() - st.t0)}")
        raise
    if st.elapsed is None:
        st.elapsed = time.monotonic() - st.t0  # frozen: read again after the stage
    note = f"{st.note}, " if st.note else ""
    say(f"{name}: {st.detail} ({note}{seconds(st.seconds())})")


class Progress:
    """A progress bar: a tqdm bar on a terminal, plain lines elsewhere, nothing when quiet.
    `set`/`advance` may be called from any thread."""

    def __init__(self, label: str, total: int | None, unit: str = "",
                 initial: int = 0) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.count, self.t0 = initial, time.monotonic()
        self._said_t, self._said_quarter = self.t0, self._quarter(initial)
        self._bar = None
        if _level >= NORMAL and _terminal():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=label, unit=f" {unit}" if unit else "it",
                             file=sys.stderr, leave=False, dynamic_ncols=True)

    def _quarter(self, count: int) -> int:
        return 4 * count // self.total if self.total else 0

    def advance(self, n: int = 1) -> None:
        self.set(self.count + n)

    def set(self, count: int, total: int | None = None) -> None:
        with _lock:
            if total is not None and total != self.total:
                self.total = total
                if self._bar is not None:
                    self._bar.total = total
                    self._bar.refresh()
            if count == self.count:
                return
            step, self.count = count - self.count, count
            if self._bar is not None:
                self._bar.update(step)
                return
            now, quarter = time.monotonic(), self._quarter(count)
            if quarter > self._said_quarter or now - self._said_t >= PLAIN_EVERY_S:
                self._said_t, self._said_quarter = now, quarter
                of = f"/{self.total}" if self.total else ""
                unit = f" {self.unit}" if self.unit else ""
                say(f"  {self.label}: {count}{of}{unit} ({seconds(now - self.t0)})")

    def close(self) -> None:
        with _lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None


def progress(label: str, total: int | None, unit: str = "", initial: int = 0) -> Progress:
    """A bar for work whose steps the caller sees: `bar.advance()` per step, then
    `bar.close()` (or use `watch` to poll a count)."""
    return Progress(label, total, unit, initial)


Poll = Callable[[], tuple[int, int | None]]


@contextmanager
def watch(label: str, poll: Poll, unit: str = "", every_s: float = 1.0) -> Iterator[Progress]:
    """A bar fed by polling `poll() -> (done, total or None)` from a background thread while
    the block runs: for work the driver does not run itself but can see (shard files
    written, round checkpoints reported). A poll that fails shows no progress; it never
    fails the work (logged at DEBUG)."""

    def safe() -> tuple[int, int | None] | None:
        try:
            return poll()
        except Exception as exc:  # noqa: BLE001 - a progress display never fails a job
            log.debug("progress poll for %r failed: %s", label, exc)
            return None

    first = safe() or (0, None)
    bar = progress(label, first[1], unit, initial=first[0])
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every_s):
            seen = safe()
            if seen is not None:
                bar.set(*seen)

    thread = threading.Thread(target=loop, name=f"aspkd-progress-{label}", daemon=True)
    thread.start()
    try:
        yield bar
    finally:
        stop.set()
        thread.join(timeout=every_s + 10)
        seen = safe()
        if seen is not None:
            bar.set(*seen)
        bar.close()
