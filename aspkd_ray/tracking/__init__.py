"""MLflow tracking: a SQLite file in the run's folder unless a URI is configured.

With the default store, the run's artifacts (the student, plots, config) go under the storage
root (`<root>/mlflow-artifacts`), not into the working directory. When the root is object
storage, the SQLite file lives in a local working folder while the job runs and is copied to
`<root>/mlflow.db` at the end (and fetched from there when a run resumes elsewhere).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from aspkd_ray import console, storage
from aspkd_ray.config import Config, flatten
from aspkd_ray.errors import UserError

log = logging.getLogger(__name__)

# The user's choice, read once: mlflow.set_tracking_uri() writes MLFLOW_TRACKING_URI into this
# process's environment, and a second run would otherwise log into the first run's database.
_USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")
SQLITE_PREFIX = "sqlite:///"
LOCK_TIMEOUT_S = 300.0  # creating the tables takes seconds; a lock held longer is stuck


def tracking_uri(cfg: Config) -> str:
    """tracking.mlflow_uri, else MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db."""
    if cfg.tracking.mlflow_uri:
        return cfg.tracking.mlflow_uri
    if _USER_TRACKING_URI:
        return _USER_TRACKING_URI
    db = Path(work_dir(cfg)) / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"{SQLITE_PREFIX}{db}"


_WORK_DIRS: dict[str, str] = {}


def work_dir(cfg: Config) -> str:
    """The local folder for what must be a local file (MLflow's SQLite while it is open):
    the output directory, or, when the storage root is not a local folder, a temporary
    folder of this process (one per root)."""
    from aspkd_ray.layout import storage_root

    root = storage_root(cfg)
    if not storage.is_uri(root):
        return str(Path(cfg.output_dir).resolve())
    if root not in _WORK_DIRS:
        _WORK_DIRS[root] = tempfile.mkdtemp(prefix="aspkd-work-")
    return _WORK_DIRS[root]


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI, else None (a server or another store)."""
    if not uri.startswith(SQLITE_PREFIX):
        return None
    path = uri[len(SQLITE_PREFIX):].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


@contextlib.contextmanager
def _init_lock(uri: str) -> Iterator[None]:
    """Hold `<db>.lock` while MLflow creates or migrates a SQLite database.

    MLflow creates the tables (an alembic migration) the first time a process opens the
    file; two processes doing it at once fail ("table _alembic_tmp_... already exists").
    The lock serialises that step between processes; the second one finds the tables made.
    """
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    from filelock import FileLock, Timeout

    db.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(db) + ".lock")
    try:
        lock.acquire(timeout=LOCK_TIMEOUT_S)
    except Timeout:
        raise UserError(f"MLflow database {db}: another process has held {lock.lock_file} for "
                        f"{LOCK_TIMEOUT_S:.0f} s while creating it; if no other aspkd run "
                        f"is starting, delete the lock file and rerun.") from None
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def mlflow_run(cfg: Config, run_name: str, tags: dict | None = None,
               run_id: str | None = None) -> Iterator[object]:
    """Start an MLflow run with the whole config logged as params; with `run_id`, reopen
    that (finished) run of the same store to log more to it (the params are there)."""
    import mlflow

    # MLflow's SQLite store logs its migrations and table creation at INFO (MLflow's own
    # console handler): noise for our users, shown with -v.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("mlflow.store.db.utils").setLevel(
        logging.INFO if console.verbose() else logging.WARNING)
    uri = tracking_uri(cfg)
    default_store = uri == _default_uri(cfg)
    remote_db = _remote_db(cfg) if default_store else None
    if remote_db is not None:
        _fetch(remote_db, sqlite_path(uri))
    mlflow.set_tracking_uri(uri)
    with _init_lock(uri):  # table creation and the experiment: once, by one process
        _experiment(cfg, default_store)
    try:
        if run_id is not None:
            with mlflow.start_run(run_id=run_id, tags=tags) as run:
                yield run
            return
        with mlflow.start_run(run_name=run_name, tags=tags) as run:
            params = {k: ("null" if v is None else str(v))[:500]
                      for k, v in flatten(cfg).items()}
            mlflow.log_params(params)
            yield run
    finally:
        if remote_db is not None:
            _store(sqlite_path(uri), remote_db)


def _default_uri(cfg: Config) -> str:
    return f"{SQLITE_PREFIX}{Path(work_dir(cfg)) / 'mlflow.db'}"


def _experiment(cfg: Config, default_store: bool) -> None:
    """Set the experiment; the default store's new experiments keep their artifacts under
    the storage root (MLflow would otherwise use ./mlruns in the working directory)."""
    import mlflow

    name = cfg.tracking.experiment
    if default_store and mlflow.get_experiment_by_name(name) is None:
        from aspkd_ray.layout import run_layout

        location = run_layout(cfg).mlflow_artifacts
        if not storage.is_uri(location):
            location = Path(location).as_uri()
        mlflow.create_experiment(name, artifact_location=location)
    mlflow.set_experiment(name)


def _remote_db(cfg: Config) -> str | None:
    from aspkd_ray.layout import run_layout

    db = run_layout(cfg).mlflow_db
    return db if storage.is_uri(db) else None


def _fetch(remote: str, local: Path) -> None:
    fs, path = storage.resolve(remote)
    if not local.exists() and storage.exists(fs, path):
        local.write_bytes(storage.read_bytes(fs, path))


def _store(local: Path, remote: str) -> None:
    if local.exists():
        fs, path = storage.resolve(remote)
        storage.write_bytes(fs, path, local.read_bytes())
