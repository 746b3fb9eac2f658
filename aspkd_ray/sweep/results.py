"""A sweep's results: the table (JSON and Markdown), the plot of the objective against each
swept parameter, and the best trial's config as a ready-to-run YAML."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from aspkd_ray.config.loader import with_overrides

OBJECTIVE_TITLES = {
    "attacker": "objective: attacker (val_agreement = agreement with the sweep's bought "
                "validation labels; what an attacker can measure)",
    "research": "objective: research (agreement = test agreement with the victim, measured "
                "by the experimenter's oracle; an attacker cannot compute it)",
}


def rank_rows(rows: list[dict], metric: str) -> list[dict]:
    """Best first by `metric` (higher is better); trials without it last."""
    def key(row: dict) -> float:
        value = row.get(metric)
        return -value if isinstance(value, (int, float)) and not math.isnan(value) else math.inf
    return sorted(rows, key=key)


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 0.01 or abs(value) >= 1000 else f"{value:.2f}"
    return str(value)


def results_markdown(rows: list[dict], keys: list[str], objective: str, metric: str,
                     spent: dict) -> str:
    """The results table, best first, headed by the objective it was ranked by."""
    cols = ["trial", *keys, metric, *(["agreement"] if metric != "agreement" else []),
            "pseudo_label_agreement", "calls_used", "rounds_done", "status"]
    lines = [f"# Sweep results, ranked by {metric}", "", OBJECTIVE_TITLES[objective], "",
             f"Global spend: {spent.get('spent')} of {spent.get('budget')} calls "
             f"({spent.get('validation', 0)} of them for the shared validation labels).", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def plot_parameters(rows: list[dict], space: dict, metric: str, path: str | Path) -> None:
    """One panel per swept parameter: the objective of each trial against its value (test
    agreement beside it when that is not the objective); hollow marks for trials stopped
    early by the scheduler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(space)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    series = [(metric, "C0", "o")] + ([("agreement", "C1", "s")] if metric != "agreement"
                                      else [])
    for ax, key in zip(axes[0], keys, strict=True):
        kind = next(iter(space[key]))
        values = [row.get(key) for row in rows]
        categorical = any(isinstance(v, (str, bool)) or v is None for v in values)
        labels = sorted({str(v) for v in values}) if categorical else []
        for name, color, marker in series:
            for stopped in (False, True):
                pts = [(labels.index(str(row.get(key))) if categorical else row.get(key),
                        row.get(name)) for row in rows
                       if isinstance(row.get(name), (int, float))
                       and bool(row.get("stopped_early")) == stopped]
                if not pts:
                    continue
                xs, ys = zip(*pts, strict=True)
                shown = "test agreement" if name == "agreement" else name
                ax.scatter(xs, ys, marker=marker, label=shown + (" (stopped)" if stopped
                                                                 else ""),
                           facecolors="none" if stopped else color, edgecolors=color)
        if categorical:
            ax.set_xticks(range(len(labels)), labels)
        elif kind == "loguniform":
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel("% agreement")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"sweep: {metric} against each swept parameter", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def best_config_yaml(base: dict, overrides: list[str], params: dict, header: str) -> str:
    """The base config with the sweep's overrides and the best trial's parameters applied:
    `aspkd steal --config best.yaml` runs it."""
    from aspkd_ray.sweep.trial import param_overrides

    data = with_overrides(base, list(overrides) + param_overrides(params))
    return f"# {header}\n" + yaml.safe_dump(data, sort_keys=False)
