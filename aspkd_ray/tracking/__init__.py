"""MLflow tracking: a SQLite file in the output directory unless a URI is configured."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

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
    db = Path(cfg.output_dir).resolve() / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"{SQLITE_PREFIX}{db}"


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
def mlflow_run(cfg: Config, run_name: str, tags: dict | None = None) -> Iterator[object]:
    """Start an MLflow run with the whole config logged as params."""
    import mlflow

    # MLflow's SQLite store logs its migrations at INFO; they are noise for our users.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    with _init_lock(uri):  # table creation and the experiment: once, by one process
        mlflow.set_experiment(cfg.tracking.experiment)
    with mlflow.start_run(run_name=run_name, tags=tags) as run:
        params = {k: ("null" if v is None else str(v))[:500] for k, v in flatten(cfg).items()}
        mlflow.log_params(params)
        yield run
