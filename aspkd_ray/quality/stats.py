"""Paired statistics over seeds: seed i of every method saw the same proxy set and student
init, so a component's effect is the mean of per-seed differences, with a percentile
bootstrap interval over seeds."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import numpy as np

BOOTSTRAP_SAMPLES = 10_000


@dataclass(frozen=True)
class PairedDiff:
    mean: float
    low: float            # 95% percentile-bootstrap interval of the mean difference
    high: float
    n: int                # seeds both methods ran

    @property
    def distinguishable(self) -> bool:
        """The interval excludes 0."""
        return self.low > 0 or self.high < 0


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (0 for one value)."""
    if not values:
        raise ValueError("mean_std needs at least one value")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired_diff(a: dict[int, float], b: dict[int, float], *, seed: int = 0,
                samples: int = BOOTSTRAP_SAMPLES) -> PairedDiff | None:
    """a − b over the seeds both have (dicts seed → value); None when none are shared.

    With few seeds the percentile bootstrap is narrower than a t interval would be; the
    report says how many seeds each interval rests on."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    d = np.array([a[s] - b[s] for s in seeds], dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(samples, len(d)))].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return PairedDiff(float(d.mean()), float(low), float(high), len(d))
