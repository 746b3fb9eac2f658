"""`aspkd demo`: the embedded scenario end to end, reusing cached victim, generator and proxy."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from aspkd_ray.config import Config, config_hash


def proxy_cache_dir(cfg: Config) -> Path:
    """A proxy set keyed by everything that shapes it, so demos and sweeps share one."""
    gen = dataclasses.asdict(cfg.generator)
    gen.pop("batch_size")
    proxy = dataclasses.asdict(cfg.proxy)
    proxy.pop("dir")
    key = config_hash({"generator": gen, "proxy": proxy, "dataset": cfg.dataset.name,
                       "size": cfg.dataset.image_size, "seed": cfg.seed})
    name = cfg.dataset.name
    return Path(cfg.cache_dir) / name / f"proxyset-{key[:10]}"


def demo_config(cfg: Config, output_dir_given: bool) -> Config:
    """Fresh run folder per demo (a finished attack and its spent ledger are not reused),
    proxy set from the cache."""
    out = cfg.output_dir
    if not output_dir_given:
        out = str(Path(cfg.output_dir) / time.strftime("demo-%Y%m%d-%H%M%S"))
    proxy = cfg.proxy
    if proxy.dir is None:
        proxy = dataclasses.replace(proxy, dir=str(proxy_cache_dir(cfg)))
    return dataclasses.replace(cfg, output_dir=out, proxy=proxy)


def format_report(summary: dict) -> str:
    t = summary["wall_time_s"]
    rounds = ", ".join(f"{a:.1f}%" for a in summary["agreement_by_round"])
    lines = [
        "",
        f"ASPKD demo on {summary['dataset']} ({summary['method']}, "
        f"{summary['victim_output']}-label victim)",
        f"  agreement with the victim on its real test set: {summary['agreement']:.1f}%"
        f"  (by round: {rounds})",
        f"  teacher calls used: {summary['calls_used']} of {summary['budget']} "
        f"({summary['calls_per_class']:g} per class)",
    ]
    if summary.get("pretrain"):
        lines.append(f"  student init: pre-trained on the proxy set's generation classes, no "
                     f"calls ({summary['pretrain']['val_score']:.1f}% on proxy validation)")
    if summary.get("pseudo_label_agreement") is not None:
        lines.append(f"  pseudo-labels: {summary['pseudo_label_filter_rate'] * 100:.1f}% "
                     f"filtered out, {summary['pseudo_label_agreement']:.1f}% agree with the "
                     f"victim (diagnostic, never seen by the attack)")
    lines.append("  time per stage: " + ", ".join(f"{k} {v:.0f}s" for k, v in t.items()))
    out = summary["output_dir"]
    lines += [f"  results: {out}/summary.json, plot {out}/agreement.png",
              f"  MLflow run {summary['mlflow_run_id']}: mlflow ui --backend-store-uri "
              f"{summary['mlflow_uri']}"]
    return "\n".join(lines)
