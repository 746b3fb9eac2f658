"""Where everything a run writes lives: one layout, worked out in one place.

Under the storage root (`storage.root`, else the output directory; a local folder, an NFS
mount, or a pyarrow URI such as `s3://bucket/run`):

    proxy/              the proxy set: part-*.parquet, _plan.json, _manifest.json
                        (or under proxy.dir, shared by runs and sweep trials)
    ledger/             the teacher service's ledger (or budget.ledger)
    ray_train/          Ray Train checkpoints, one per round
    ray_tune/           Ray Tune results (sweeps)
    trials/<trial>/     a sweep trial's own files (the same layout, minus the shared parts)
    summary.json        the attack's results
    agreement.png       its plot
    mlflow.db           the MLflow store when tracking is the default SQLite (copied here at
                        the end of a job when the root is not a local folder)
    mlflow-artifacts/   MLflow artifacts (the student, plots, configs) of the default store

The output directory stays a local working folder for what a library insists on writing to
local disk (MLflow's SQLite file while it is open); nothing else is kept only there.
"""

from __future__ import annotations

from dataclasses import dataclass

from aspkd_ray import storage
from aspkd_ray.config import Config


def join(location: str, *parts: str) -> str:
    """`location` / parts, for a local path or a URI (keeps a URI's ?query at the end)."""
    base, _, query = location.partition("?") if storage.is_uri(location) else (location, "", "")
    path = "/".join([base.rstrip("/"), *(p.strip("/") for p in parts if p)])
    return f"{path}?{query}" if query else path


@dataclass(frozen=True)
class RunLayout:
    root: str
    proxy: str
    ledger: str
    train: str
    tune: str
    summary: str
    plot: str
    mlflow_db: str
    mlflow_artifacts: str

    def trial(self, name: str) -> str:
        """A sweep trial's own storage root."""
        return join(self.root, "trials", name)


def storage_root(cfg: Config) -> str:
    """storage.root, else the output directory (absolute path or URI)."""
    return storage.normalize(cfg.storage.root or cfg.output_dir)


def run_layout(cfg: Config) -> RunLayout:
    """Every location a run reads or writes, from its config."""
    root = storage_root(cfg)
    proxy_parent = storage.normalize(cfg.proxy.dir) if cfg.proxy.dir else root
    return RunLayout(
        root=root,
        proxy=join(proxy_parent, "proxy"),
        ledger=storage.normalize(cfg.budget.ledger) if cfg.budget.ledger else join(root, "ledger"),
        train=join(root, "ray_train"),
        tune=join(root, "ray_tune"),
        summary=join(root, "summary.json"),
        plot=join(root, "agreement.png"),
        mlflow_db=join(root, "mlflow.db"),
        mlflow_artifacts=join(root, "mlflow-artifacts"),
    )
