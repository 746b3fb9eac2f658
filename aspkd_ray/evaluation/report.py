"""Agreement and plots: the experimenter's view of an attack, computed after it ran."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def agreement(student_classes: np.ndarray, victim_classes: np.ndarray) -> float:
    """% of images where argmax S(x) == argmax T(x): the paper's metric."""
    if len(victim_classes) == 0:
        raise ValueError("agreement needs at least one test image")
    return float((np.asarray(student_classes) == np.asarray(victim_classes)).mean() * 100)


def confusion(student_classes: np.ndarray, victim_classes: np.ndarray,
              num_classes: int) -> np.ndarray:
    """Rows: victim class; columns: student class."""
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(m, (np.asarray(victim_classes), np.asarray(student_classes)), 1)
    return m


def plot_attack(summary: dict, out: str | Path, conf: np.ndarray | None = None,
                class_names: tuple[str, ...] = ()) -> Path:
    """One figure: agreement by round (with calls used), and the student-vs-victim confusion."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    cols = 2 if conf is not None else 1
    fig, axes = plt.subplots(1, cols, figsize=(5.5 * cols, 4.2))
    axes = np.atleast_1d(axes)
    ax = axes[0]
    rounds = summary.get("rounds", [])
    x = [r["calls_used"] for r in rounds]
    y = [r["agreement"] for r in rounds]
    ax.plot(x, y, "o-", label="student after round")
    for r in rounds:
        ax.annotate(f"r{r['round'] + 1}", (r["calls_used"], r["agreement"]),
                    textcoords="offset points", xytext=(4, -12), fontsize=8)
    for name, value in (summary.get("baselines") or {}).items():
        ax.axhline(value, ls="--", lw=1, color="gray")
        ax.text(0, value, f" {name} {value:.1f}%", va="bottom", fontsize=8, color="gray")
    ax.set_xlabel("teacher calls used")
    ax.set_ylabel("agreement with the victim (%)")
    ax.set_title(f"{summary.get('dataset', '')}: {summary.get('agreement', 0):.1f}% with "
                 f"{summary.get('calls_used', 0)} calls")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    if conf is not None:
        ax2 = axes[1]
        norm = conf / np.maximum(conf.sum(1, keepdims=True), 1)
        ax2.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        ax2.set_xlabel("student class")
        ax2.set_ylabel("victim class")
        ax2.set_title("student vs victim on the test set")
        if class_names and len(class_names) <= 20:
            ax2.set_xticks(range(len(class_names)), class_names, rotation=90, fontsize=7)
            ax2.set_yticks(range(len(class_names)), class_names, fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
