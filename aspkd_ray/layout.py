"""Where everything a run writes lives, and the shapes it works with: derived values,
worked out in one place (the run layout, the victim's folder, the input shape).

Under the storage root (`storage.root`, else the output directory; a local folder, an NFS
mount, or a pyarrow URI such as `s3://bucket/run`):

    proxy/              the proxy set: part-*.parquet, _plan.json, _manifest.json
                        (or under proxy.dir, shared by runs and sweep trials)
    ledger/             the teacher service's ledger (or budget.ledger)
    ray_train/          Ray Train checkpoints, one per round
    ray_tune/           Ray Tune results (sweeps)
    trials/<trial>/     a sweep trial's own files (the same layout, minus the shared parts)
    sweep.json          a sweep's spec and MLflow parent run; sweep_results.{md,json},
                        sweep.png, best.yaml: its results
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
from pathlib import Path

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


def input_shape(cfg: Config) -> tuple[int, int]:
    """(image_size, channels) of the victim's input."""
    from aspkd_ray.datasets import get_spec

    spec = get_spec(cfg.dataset.name)
    return cfg.dataset.image_size or spec.image_size, cfg.dataset.channels or spec.channels


def horizontal_flip(cfg: Config) -> bool:
    """Whether training augmentation flips images: dataset.horizontal_flip, else the data
    set's default (never for digits: a flipped 2 is not a 2)."""
    from aspkd_ray.datasets import get_spec

    if cfg.dataset.horizontal_flip is not None:
        return cfg.dataset.horizontal_flip
    return get_spec(cfg.dataset.name).horizontal_flip


def victim_checkpoint_dir(cfg: Config) -> Path:
    """The victim's folder as a local Path (see `victim_location`; a URI has no local Path:
    read it through `cache.local_copy(victim_location(cfg))`)."""
    location = victim_location(cfg)
    if storage.is_uri(location):
        raise ValueError(f"the victim is at {location}, not in a local folder; read it "
                         f"through aspkd_ray.cache.local_copy(victim_location(cfg)).")
    return Path(location)


def victim_location(cfg: Config) -> str:
    """victim.checkpoint, else a cache folder keyed by data set, architecture and settings:
    a local path or a URI (cache_dir or victim.checkpoint on object storage)."""
    from aspkd_ray import cache
    from aspkd_ray.config import config_hash
    from aspkd_ray.datasets.sources import victim_data_name
    from aspkd_ray.victim.train import victim_training_config

    if cfg.victim.checkpoint:
        return str(cfg.victim.checkpoint)
    key = config_hash({"dataset": cfg.dataset.name, "arch": cfg.victim.architecture,
                       "size": input_shape(cfg), "seed": cfg.seed,
                       # None = an option left off: a new optional setting must not move
                       # every existing victim to a new key
                       "training": {k: v for k, v in victim_training_config(cfg).__dict__.items()
                                    if v is not None}})
    # digits and digits-xdomain share the victim: the same MNIST split trains it.
    name = victim_data_name(cfg.dataset.name)
    return cache.join(str(cfg.cache_dir), name, f"victim-{cfg.victim.architecture}-{key[:8]}")
