"""MLflow tracking: a SQLite file in the output directory unless a URI is configured."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from aspkd_ray.config import Config, flatten

log = logging.getLogger(__name__)

# The user's choice, read once: mlflow.set_tracking_uri() writes MLFLOW_TRACKING_URI into this
# process's environment, and a second run would otherwise log into the first run's database.
_USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


def tracking_uri(cfg: Config) -> str:
    """tracking.mlflow_uri, else MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db."""
    if cfg.tracking.mlflow_uri:
        return cfg.tracking.mlflow_uri
    if _USER_TRACKING_URI:
        return _USER_TRACKING_URI
    db = Path(cfg.output_dir).resolve() / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


@contextlib.contextmanager
def mlflow_run(cfg: Config, run_name: str, tags: dict | None = None) -> Iterator[object]:
    """Start an MLflow run with the whole config logged as params."""
    import mlflow

    # MLflow's SQLite store logs its migrations at INFO; they are noise for our users.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(tracking_uri(cfg))
    mlflow.set_experiment(cfg.tracking.experiment)
    with mlflow.start_run(run_name=run_name, tags=tags) as run:
        params = {k: ("null" if v is None else str(v))[:500] for k, v in flatten(cfg).items()}
        mlflow.log_params(params)
        yield run
