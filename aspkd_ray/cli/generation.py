"""`aspkd train-generator`, `aspkd generate`, `aspkd show-proxy`: the proxy data stage."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from aspkd_ray.cli.main import add_common, load_config
from aspkd_ray.errors import UsageError


def register(sub) -> None:
    p = sub.add_parser("train-generator", help="train the embedded class-conditional DDPM",
                       description="Train the small class-conditional diffusion model of the "
                                   "embedded scenarios (generator.kind=ddpm) on the scenario's "
                                   "generator data; save it in diffusers format in the cache "
                                   "(or generator.model); resumes from its checkpoint; logs "
                                   "to MLflow.")
    add_common(p)
    p.set_defaults(func=run_train)

    p = sub.add_parser("generate", help="generate the proxy data set with Ray Data",
                       description="Generate the proxy set (m images, classes and prompt "
                                   "templates drawn as in Algorithm 1) on Ray Data generator "
                                   "actors into <proxy.dir or storage.root or OUTPUT_DIR>/"
                                   "proxy/ (a local folder or a URI such as s3://bucket/run) "
                                   "as Parquet plus _manifest.json; the actors write the "
                                   "shards themselves. An interrupted run resumes where it "
                                   "stopped. Trains the embedded DDPM first if needed.")
    add_common(p)
    p.set_defaults(func=run_generate)

    p = sub.add_parser("show-proxy", help="write a PNG grid of proxy samples per class",
                       description="Write a grid of proxy images, one row per class, from "
                                   "<proxy.dir or storage.root or OUTPUT_DIR>/proxy (like "
                                   "the paper's Figure 2) to a local PNG.")
    add_common(p)
    p.add_argument("--per-class", type=int, default=8, help="images per class (default 8)")
    p.add_argument("--out", metavar="PATH", default=None,
                   help="PNG to write, a local path or a URI (default OUTPUT_DIR/"
                        "proxy_grid.png, on this machine)")
    p.set_defaults(func=run_show)


def run_train(args: argparse.Namespace) -> int:
    import mlflow

    from aspkd_ray.generation import train_generator
    from aspkd_ray.generation.ddpm import read_info
    from aspkd_ray.generation.train_ddpm import check_trainable
    from aspkd_ray.tracking import mlflow_run

    cfg = load_config(args)
    check_trainable(cfg)  # before MLflow writes anything
    with mlflow_run(cfg, "train-generator", tags={"stage": "train-generator"}) as run:
        folder = train_generator(cfg)
        info = read_info(folder)
        for key in ("final_loss", "wall_time_s"):
            if info.get(key) is not None:
                mlflow.log_metric(key, info[key])
    print(f"generator ready at {folder} (MLflow run {run.info.run_id})")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    import mlflow

    from aspkd_ray.generation import generate_proxy_at
    from aspkd_ray.generation.registry import check_generator, prepare_generator
    from aspkd_ray.layout import run_layout
    from aspkd_ray.runtime import connect
    from aspkd_ray.tracking import mlflow_run

    cfg = load_config(args)
    proxy = run_layout(cfg).proxy
    check_generator(cfg)  # a bad plugin fails here, before Ray starts
    prepare_generator(cfg)  # e.g. trains the embedded DDPM if it is not there yet
    connect(cfg.ray.address, cfg.ray.namespace)
    with mlflow_run(cfg, "generate", tags={"stage": "generate"}) as run:
        manifest = generate_proxy_at(cfg, proxy)
        stats = manifest.get("run", {})
        mlflow.log_metric("proxy_images", manifest["num_samples"])
        if stats.get("generated") and stats.get("wall_time_s"):
            mlflow.log_metric("generated_images", stats["generated"])
            mlflow.log_metric("images_per_s", stats["generated"] / stats["wall_time_s"])
        mlflow.log_dict(manifest, "proxy_manifest.json")
    splits = json.dumps(manifest["splits"])
    print(f"proxy set: {manifest['num_samples']} images ({splits}) in {proxy}; "
          f"generator {manifest['generator']}; MLflow run {run.info.run_id}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    from aspkd_ray.generation import show_proxy_grid
    from aspkd_ray.layout import run_layout

    if args.per_class < 1:
        raise UsageError(f"--per-class: got {args.per_class}; expected a positive integer.")
    cfg = load_config(args)
    # A picture for the user: on this machine, even when the run's storage is elsewhere.
    out = args.out or Path(cfg.output_dir) / "proxy_grid.png"
    path = show_proxy_grid(run_layout(cfg).proxy, out, per_class=args.per_class)
    print(f"wrote {path}")
    return 0
