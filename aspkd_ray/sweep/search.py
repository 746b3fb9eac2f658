"""Search algorithms and trial schedulers, by name (sweep.search, sweep.scheduler).

Each entry is a function returning the Ray Tune object: a search of (spec, seed, trials at a
time), a scheduler of (spec); a new one is one function and one `register` call. Every search is seeded: a sweep run again draws
the same trials.
"""

from __future__ import annotations

from typing import Any

from aspkd_ray.registry import Registry

SEARCHES: Registry = Registry("sweep.search")
SCHEDULERS: Registry = Registry("sweep.scheduler")
ROUND = "round_done"  # the trials' time axis: rounds completed


def search_space(space: dict[str, dict[str, list]]) -> dict[str, Any]:
    """The sweep file's space as Tune's (grid_search, choice, uniform, loguniform, randint)."""
    from ray import tune

    out = {}
    for key, dist in space.items():
        kind, values = next(iter(dist.items()))
        if kind == "grid":
            out[key] = tune.grid_search(values)
        elif kind == "choice":
            out[key] = tune.choice(values)
        else:  # uniform / loguniform / randint take bounds
            out[key] = getattr(tune, kind)(*values)
    return out


@SEARCHES.register("basic")
def basic(spec, seed: int, concurrent: int):
    """Grid values crossed with random draws (choice, uniform, ...), drawn from `seed`."""
    from ray.tune.search import BasicVariantGenerator

    # It limits concurrency itself (Tune ignores max_concurrent_trials for it).
    return BasicVariantGenerator(random_state=seed, max_concurrent=concurrent)


@SEARCHES.register("optuna")
def optuna(spec, seed: int, concurrent: int):
    """Optuna's TPE sampler (the optuna package through ray.tune.search.optuna)."""
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    return ConcurrencyLimiter(OptunaSearch(seed=seed), max_concurrent=concurrent)


@SCHEDULERS.register("fifo")
def fifo(spec):
    """Every trial runs all its rounds."""
    return None  # Tune's FIFOScheduler


@SCHEDULERS.register("asha")
def asha(spec):
    """Asynchronous successive halving on rounds: after grace_rounds, and then at every
    reduction_factor-times more rounds, a trial below the best 1/reduction_factor of the
    trials that reached that round is stopped (its spend stays in the ledger)."""
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr=ROUND, max_t=10_000, grace_period=spec.asha["grace_rounds"],
                         reduction_factor=spec.asha["reduction_factor"])
