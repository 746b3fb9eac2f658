"""PRADA: flagging a client whose query stream looks like a model-stealing attack.

Juuti, Szyller, Marchal, Asokan, "PRADA: Protecting against DNN Model Stealing Attacks",
IEEE EuroS&P 2019 (arXiv:1805.02628). Benign clients send natural samples, whose distances to
their nearest earlier query are close to normally distributed; an attacker's synthetic queries
(small perturbations of a few seeds) give many tiny distances and a few large ones, a skewed
distribution. PRADA watches one client's stream (steps as we read the paper's Algorithm 1):

1. each query x is given a class c (the victim's prediction in the paper; pass `classes`, or
   None for one class-agnostic set);
2. if the growing set G_c is empty, x starts it and no distance is recorded; else
   d = min over y in G_c of ||x - y||_2 is appended to D;
3. x joins G_c only when d > T_c, and then T_c = max(T_c, mean(D_Gc) - std(D_Gc)) over the
   distances D_Gc of the members that joined so far: the set keeps samples that are far
   apart, so a burst of near-duplicates does not shrink the distances of later queries;
4. once D holds `min_distances` values, the Shapiro-Wilk statistic W is computed on D after
   dropping the values more than `outlier_std` (3) standard deviations from its mean, after
   every query; the stream is flagged the first time W < delta.

Choices where the paper leaves room, or where small budgets need another default:
- min_distances defaults to 50. The paper evaluates streams of thousands of queries; a
  few-call attack (ASPKD) buys 10-50 labels per class, so it must be testable early. Not
  lower: W from few values is noisy (for 20 normal values, W < 0.905 one time in 20), and on
  shuffled MNIST test images (300-600 per stream), testing from 20 distances on flagged 5
  of 30 benign streams at delta = 0.9, from 50 none of 40. Lower it only with a stricter
  delta.
- delta defaults to 0.9, a starting point: the paper sets delta per victim from benign
  traffic so that none of it is flagged. Tune it on the victim's own benign queries (or
  `shapiro_w` of their distances) for a real audit.
- D all equal (e.g. every query an exact repeat) is a point mass, nothing like a normal
  distribution: W is taken as 0 there (scipy would warn and return 1).
- Distances are plain L2 on the flattened arrays as given (scale does not change W).

`queries_from_ledger` reads what a finished attack asked, per client, from its ledger; images
are left to a loader the caller passes (ids -> N x ... array). For a proxy set on disk:
`index = aspkd_ray.pool.PoolIndex.open(proxy_dir)` then
`load = lambda ids: index.read_images(np.searchsorted(index.ids, ids))` (the index keeps its
ids sorted, so searchsorted gives each id's position).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

DELTA = 0.9
MIN_DISTANCES = 50
OUTLIER_STD = 3.0


@dataclass(frozen=True)
class PradaResult:
    """flagged: W < delta at some point of the stream. calls_to_detection: the number of
    queries after which it was first flagged (None when never). w: W after each query (N,),
    NaN before D held min_distances values. distances: D, in order. growing_set: members of
    the growing sets at the end, all classes together."""

    flagged: bool
    calls_to_detection: int | None
    w: np.ndarray
    distances: np.ndarray
    growing_set: int
    delta: float
    min_distances: int


class _GrowingSet:
    """One class's growing set G_c, its members' distances D_Gc and its threshold T_c."""

    def __init__(self, dim: int) -> None:
        self.members = np.empty((16, dim), np.float64)
        self.size = 0
        self.joined: list[float] = []
        self.threshold = 0.0

    def nearest(self, x: np.ndarray) -> float:
        # Differences, not the |a|^2 - 2ab + |b|^2 expansion: near-duplicates have tiny
        # distances that the expansion's cancellation would turn into noise.
        diff = self.members[:self.size] - x
        return float(np.sqrt(np.einsum("ij,ij->i", diff, diff).min()))

    def add(self, x: np.ndarray, d: float | None) -> None:
        if self.size == len(self.members):
            self.members = np.concatenate([self.members, np.empty_like(self.members)])
        self.members[self.size] = x
        self.size += 1
        if d is not None:
            self.joined.append(d)
            self.threshold = max(self.threshold, float(np.mean(self.joined) -
                                                       np.std(self.joined)))


def shapiro_w(distances: np.ndarray, outlier_std: float | None = OUTLIER_STD) -> float:
    """Shapiro-Wilk W of `distances`, values beyond `outlier_std` standard deviations from
    the mean left out first (None: keep all); 0 for a point mass."""
    from scipy.stats import shapiro

    d = np.asarray(distances, np.float64)
    if outlier_std is not None:
        mean, std = d.mean(), d.std()
        if std > 0:
            d = d[np.abs(d - mean) <= outlier_std * std]
    if len(d) < 3 or np.ptp(d) <= 1e-12 * max(1.0, float(np.abs(d).max())):
        return 0.0
    with warnings.catch_warnings():  # N > 5000: scipy warns about the p-value, unused here
        warnings.simplefilter("ignore")
        return float(shapiro(d).statistic)


def prada_detect(queries: np.ndarray, classes: Sequence[int] | np.ndarray | None = None, *,
                 delta: float = DELTA, min_distances: int = MIN_DISTANCES,
                 outlier_std: float | None = OUTLIER_STD) -> PradaResult:
    """Run PRADA over one client's stream: `queries` N x ... (any numeric array, in query
    order), `classes` (N,) the class of each query (the victim's answer in the paper), or
    None for one class-agnostic growing set."""
    x = np.asarray(queries)
    if x.ndim < 2:
        raise ValueError(f"queries must be N x ... (one row per query), got shape {x.shape}.")
    if not 0 < delta <= 1:
        raise ValueError(f"delta must be in (0, 1], got {delta!r}.")
    if min_distances < 3:
        raise ValueError(f"min_distances must be >= 3 (Shapiro-Wilk needs 3 values), got "
                         f"{min_distances!r}.")
    n = len(x)
    flat = x.reshape(n, -1).astype(np.float64)
    if classes is None:
        cls = np.zeros(n, np.int64)
    else:
        cls = np.asarray(classes)
        if cls.shape != (n,):
            raise ValueError(f"classes must have one entry per query ({n}), got shape "
                             f"{cls.shape}.")
    sets: dict[int, _GrowingSet] = {}
    distances: list[float] = []
    w = np.full(n, np.nan)
    first: int | None = None
    for t in range(n):
        g = sets.setdefault(int(cls[t]), _GrowingSet(flat.shape[1]))
        if g.size == 0:
            g.add(flat[t], None)
            continue
        d = g.nearest(flat[t])
        distances.append(d)
        if d > g.threshold:
            g.add(flat[t], d)
        if len(distances) >= min_distances:
            w[t] = shapiro_w(np.asarray(distances), outlier_std)
            if first is None and w[t] < delta:
                first = t + 1
    return PradaResult(flagged=first is not None, calls_to_detection=first, w=w,
                       distances=np.asarray(distances), delta=delta,
                       growing_set=sum(g.size for g in sets.values()),
                       min_distances=min_distances)


# ---- what a finished attack asked --------------------------------------------------------

@dataclass(frozen=True)
class QueryStream:
    """One client's requests as the ledger recorded them, in order (each id once: the first
    time this client asked for it). trial: the Tune trial, "" for requests without one (a
    single attack run). classes: the generation class the attack gave. predicted: the class
    the teacher answered (argmax of soft labels; -1 when never answered). charged: False
    where the sample was a free grant of one another trial had bought."""

    trial: str
    ids: list[str]
    classes: np.ndarray
    predicted: np.ndarray
    charged: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def queries_from_ledger(uri: str, *, include_grants: bool = True) -> dict[str, QueryStream]:
    """The query stream of every client (trial) of the ledger at `uri`, by trial name.

    Read-only (no lease; the ledger's checks run as it is opened). A free grant (another
    trial had already paid for the sample) still reached the API as this client's query, so
    it is in the stream unless `include_grants=False`.
    """
    from aspkd_ray.teacher.ledger import Ledger

    ledger = Ledger(uri, create=False)
    try:
        rows = ledger.charge_rows()
        answers = dict(ledger.state.answers)
    finally:
        ledger.close()
    ids = rows.column("id").to_pylist()
    charges = rows.column("charge").to_pylist()
    classes = rows.column("cls").to_pylist() if "cls" in rows.column_names else [-1] * len(ids)
    trials = rows.column("trial").to_pylist() if "trial" in rows.column_names \
        else [""] * len(ids)
    by_trial: dict[str, dict[str, tuple[int, bool]]] = {}
    for i, c, t, charge in zip(ids, classes, trials, charges, strict=True):
        if not charge and not include_grants:
            continue
        # Dicts keep insertion order: the first request of an id fixes its place.
        by_trial.setdefault(t or "", {}).setdefault(i, (int(c), bool(charge)))
    out = {}
    for trial, seen in by_trial.items():
        order = list(seen)
        out[trial] = QueryStream(
            trial=trial, ids=order,
            classes=np.asarray([seen[i][0] for i in order], np.int64),
            predicted=np.asarray([_answered_class(answers.get(i)) for i in order], np.int64),
            charged=np.asarray([seen[i][1] for i in order], bool))
    return out


def _answered_class(answer: np.ndarray | int | None) -> int:
    if answer is None:
        return -1
    arr = np.asarray(answer)
    return int(arr.argmax()) if arr.ndim else int(arr)


def audit_ledger(uri: str, load: Callable[[list[str]], np.ndarray], *,
                 per_class: bool = True, include_grants: bool = True,
                 **options) -> dict[str, PradaResult]:
    """PRADA on every client stream of a finished attack's ledger. `load(ids)` returns the
    queried images (N x ..., in the order of `ids`); per_class groups queries by the
    teacher's answer, as the paper does. `options` go to `prada_detect`."""
    out = {}
    for trial, stream in queries_from_ledger(uri, include_grants=include_grants).items():
        images = np.asarray(load(stream.ids))
        if len(images) != len(stream):
            raise ValueError(f"load returned {len(images)} images for {len(stream)} ids "
                             f"(trial {trial!r}).")
        out[trial] = prada_detect(images, stream.predicted if per_class else None, **options)
    return out
