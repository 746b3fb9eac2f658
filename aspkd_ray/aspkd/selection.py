"""Active selection: which unlabelled proxy images to send to the teacher (Algorithm 1, 12-24).

Every round, each still-unlabelled proxy image x_i has a latent z_i = S̄(x_i) from the student
encoder and a class c_i (its generation class, or the student's predicted class; the caller
decides). Per class c, the centroid μ_c of the candidates' latents is taken, and every candidate
gets the paper's Eq. (2) weight

    p_i = exp(-Δ_i / (2σ²)),   Δ_i = ||z_i - μ_c||  (Euclidean, not squared).

The same number of images is then drawn from every class, without replacement, with probability
∝ p_i inside the class. Images far from their class centroid (outliers, more likely mislabelled
by the teacher) are demoted.

`random_select` is the Knockoff-style "vanilla" baseline of Table 3: the same per-class quotas,
uniform inside a class. Both share `_class_quotas` and `_draw_per_class`.

Unlike the authors' sampler, this one does not assume balanced or contiguous classes: class ids
may be any subset of 0..num_classes-1, classes may have any size, and a class with fewer
candidates than its quota gives all it has while the shortfall goes to the other classes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from aspkd_ray.aspkd.prior import teacher_prior
from aspkd_ray.registry import Registry

SIGMA_MODES = ("absolute", "median")


@dataclass(frozen=True)
class SelectionResult:
    """The images picked in one round.

    indices:   (n_select,) int64 row indices into the N rows passed in, sorted ascending.
    weights:   (N,) float64 sampling weight of every row: for a candidate, its p_i divided by
               the largest p_j of its class (the draw happens inside a class, so this per-class
               rescaling changes nothing and keeps the weights from underflowing to 0); 0 for a
               row that is not a candidate. All 1 for `random_select`.
    per_class: (num_classes,) int64 number of images picked per class.
    sigma:     the σ actually used (sigma × √median Δ in "median" mode; NaN for random_select).
    """

    indices: np.ndarray
    weights: np.ndarray
    per_class: np.ndarray
    sigma: float


def active_select(
    latents: np.ndarray,
    classes: np.ndarray,
    n_select: int,
    num_classes: int,
    *,
    sigma: float,
    sigma_mode: str = "absolute",
    rng: np.random.Generator,
    candidates: np.ndarray | None = None,
    class_share: np.ndarray | None = None,
) -> SelectionResult:
    """Pick `n_select` candidates, the same number per class, each ∝ exp(-Δ_i / (2σ²)).

    latents:     (N, D) student latents S̄(x) of the proxy images.
    classes:     (N,) int class of each row (generation class, or the student's prediction).
    n_select:    how many images to pick this round (the round's teacher calls s).
    num_classes: |C|; every class id must lie in [0, num_classes).
    sigma:       σ of Eq. (2) ("absolute"), or a multiple of the median Δ ("median").
    sigma_mode:  "absolute": σ = sigma (the paper: 17, fitted to its AlexNet latents).
                 "median":   σ² = sigma² × median(Δ) over the candidates, so the exponent
                 Δ/(2σ²) = (Δ/median Δ)/(2 sigma²) no longer depends on the latent scale
                 (Eq. (2) does not square Δ, hence the square root).
    rng:         the only source of randomness (quota remainders and the draw).
    candidates:  the still-unlabelled pool X'': a (N,) bool mask or an array of row indices.
                 Default: every row. Centroids are computed from the candidates only.
    class_share: (C,) per-class weights of the quotas (`teacher_prior_share`); None = the
                 paper's equal quotas.

    Raises ValueError on malformed input or when n_select exceeds the number of candidates.
    """
    latents = _check_latents(latents)
    n_rows = latents.shape[0]
    classes = _check_classes(classes, n_rows, num_classes)
    sigma = _check_sigma(sigma, sigma_mode)
    _check_rng(rng)
    pool = _check_candidates(candidates, n_rows)
    _check_n_select(n_select, pool.size)

    cand_classes = classes[pool]

    # Centroid μ_c of each class's candidates, and each candidate's Euclidean distance Δ_i to it,
    # in float64 one class at a time: the temporaries are one class's latents, not the pool's.
    delta = np.empty(pool.size, dtype=np.float64)
    for c in np.unique(cand_classes):
        at = np.flatnonzero(cand_classes == c)
        lat = latents[pool[at]].astype(np.float64)
        delta[at] = np.linalg.norm(lat - lat.mean(axis=0), axis=1)

    if sigma_mode == "median":
        scale = float(np.median(delta)) if delta.size else 0.0
        # A median of 0 (half the candidates on their centroid) would make σ = 0: keep sigma.
        sigma = sigma * np.sqrt(scale) if scale > 0 else sigma

    # log p_i = -Δ_i / (2σ²). Sampling uses the logs (Gumbel keys), so no weight can underflow.
    log_p = -delta / (2.0 * sigma**2)
    indices = _draw_per_class(pool, cand_classes, log_p, n_select, num_classes, rng,
                              class_share)

    # Reported weights: p_i / max_{j in class} p_j, stable since the exponent is then <= 0.
    class_max = np.full(num_classes, -np.inf)
    np.maximum.at(class_max, cand_classes, log_p)
    weights = np.zeros(n_rows, dtype=np.float64)
    weights[pool] = np.exp(log_p - class_max[cand_classes])
    return SelectionResult(
        indices=indices,
        weights=weights,
        per_class=np.bincount(classes[indices], minlength=num_classes).astype(np.int64),
        sigma=float(sigma),
    )


def random_select(
    classes: np.ndarray,
    n_select: int,
    num_classes: int,
    *,
    rng: np.random.Generator,
    candidates: np.ndarray | None = None,
    class_share: np.ndarray | None = None,
) -> SelectionResult:
    """The vanilla (Knockoff-style) baseline: the same per-class quotas, uniform inside a class.

    Arguments as in `active_select`; every candidate has weight 1.
    """
    classes = np.asarray(classes)
    if classes.ndim != 1:
        raise ValueError(
            f"classes must be 1-D (one class id per row), got shape {classes.shape}; "
            "pass a flat array such as classes.ravel()."
        )
    n_rows = classes.shape[0]
    classes = _check_classes(classes, n_rows, num_classes)
    _check_rng(rng)
    pool = _check_candidates(candidates, n_rows)
    _check_n_select(n_select, pool.size)

    cand_classes = classes[pool]
    indices = _draw_per_class(pool, cand_classes, np.zeros(pool.size), n_select, num_classes,
                              rng, class_share)
    weights = np.zeros(n_rows, dtype=np.float64)
    weights[pool] = 1.0
    return SelectionResult(
        indices=indices,
        weights=weights,
        per_class=np.bincount(classes[indices], minlength=num_classes).astype(np.int64),
        sigma=float("nan"),
    )


# --- the registry: aspkd.selection names a strategy ----------------------------------------


@dataclass(frozen=True)
class SelectionInput:
    """What a strategy may use to pick a round's images."""

    quota: int                         # images to pick this round
    classes: np.ndarray                # (N,) class of every pool image (generation class)
    candidates: np.ndarray             # row indices still unlabelled
    num_classes: int
    rng: np.random.Generator           # the only source of randomness
    latents: Callable[[], np.ndarray]  # (N, D) S̄(x) of every pool image, computed on demand
    predicted: Callable[[], np.ndarray]  # (N,) the student's class of every pool image
    settings: object                   # the aspkd config section (sigma, centroids, ...)
    # (N, C) the student's class probabilities for every pool image, computed on demand
    probabilities: Callable[[], np.ndarray] | None = None
    # (C,) weights of the per-class quotas (aspkd.quotas: teacher_prior); None = equal
    class_share: np.ndarray | None = None


Strategy = Callable[[SelectionInput], SelectionResult]
STRATEGIES: Registry[Strategy] = Registry("aspkd.selection", builtins=("aspkd_ray.aspkd.variants",))
register_selection = STRATEGIES.register   # @register_selection("name") on a strategy
list_selections = STRATEGIES.names
get_selection = STRATEGIES.get


@register_selection("paper")
def _paper(inp: SelectionInput) -> SelectionResult:
    """Eq. (2): per class, ∝ exp(-Δ/(2σ²)) around the class centroid of S̄ (the centroids of
    generation classes, or of the student's predicted classes with aspkd.centroids)."""
    a = inp.settings
    groups = inp.predicted() if a.centroids == "predicted" else inp.classes
    return active_select(inp.latents(), groups, inp.quota, inp.num_classes, sigma=a.sigma,
                         sigma_mode=a.sigma_mode, rng=inp.rng, candidates=inp.candidates,
                         class_share=inp.class_share)


@register_selection("random")
def _random(inp: SelectionInput) -> SelectionResult:
    """Knockoff-style: the same per-class quotas, uniform inside a class (no latents)."""
    return random_select(inp.classes, inp.quota, inp.num_classes, rng=inp.rng,
                         candidates=inp.candidates, class_share=inp.class_share)


# --- shared by both samplers ---------------------------------------------------------------


def _class_quotas(available: np.ndarray, n_select: int, rng: np.random.Generator,
                  share: np.ndarray | None = None) -> np.ndarray:
    """How many images to take from each class: equal shares (or ∝ `share`), capped by what
    a class has.

    Water-filling: share what is left among the classes that still have candidates; the
    remainder of the division goes to classes drawn at random (so low class ids are not
    favoured; ∝ share when given); cap each class at its candidates; repeat with the
    shortfall. With every class large enough and no share this is n_select // |C| each plus
    1 for n_select % |C| random classes. Needs available.sum() >= n_select (checked by the
    callers).
    """
    if share is not None:
        share = np.asarray(share, np.float64)
        if share.shape != available.shape or not np.isfinite(share).all() or \
                (share < 0).any():
            raise ValueError(f"class_share: expected {available.size} finite weights >= 0, "
                             f"got {share!r}.")
    quotas = np.zeros_like(available)
    left = n_select
    while left > 0:
        open_classes = np.flatnonzero(quotas < available)
        add = _split(left, open_classes.size, None if share is None else share[open_classes],
                     rng).astype(available.dtype)
        quotas[open_classes] = np.minimum(quotas[open_classes] + add, available[open_classes])
        left = n_select - int(quotas.sum())
    return quotas


def _split(n: int, parts: int, weights: np.ndarray | None,
           rng: np.random.Generator) -> np.ndarray:
    """n as `parts` integers: equal, or the floors of shares ∝ weights; the remainder one
    each to parts drawn at random (∝ the fractional shares when weighted)."""
    if weights is None:
        each, extra = divmod(n, parts)
        add = np.full(parts, each, dtype=np.int64)
        add[rng.choice(parts, size=extra, replace=False)] += 1
        return add
    w = weights + 1e-12  # a class of weight 0 still takes a shortfall
    exact = n * w / w.sum()
    add = np.floor(exact).astype(np.int64)
    extra = n - int(add.sum())
    if extra:
        p = exact - add + 1e-12
        add[rng.choice(parts, size=extra, replace=False, p=p / p.sum())] += 1
    return add


def teacher_prior_share(bought_classes: np.ndarray, bought_labels: np.ndarray,
                        num_classes: int, cap: float = 3.0) -> np.ndarray | None:
    """Quota weights that steer calls to where the teacher's labels are scarce.

    π is the teacher's class prior on the bought images (Laplace-smoothed). A generation
    class is worth the mean of 1/π over what the teacher said of its bought images, so
    classes whose images come back as rare classes get more calls, and a class the teacher
    mostly calls the common class gets fewer. Weights are at most `cap` × their mean, so no
    class takes the whole round. None while nothing is bought (the first round: equal).
    """
    if len(bought_classes) == 0:
        return None
    labels = np.asarray(bought_labels)
    probs = labels.astype(np.float64) if labels.ndim == 2 else \
        np.eye(num_classes)[labels.astype(np.int64)]
    rarity = probs @ (1.0 / teacher_prior(labels, num_classes))  # E[1/π] of each answer
    counts = np.bincount(bought_classes, minlength=num_classes)
    sums = np.bincount(bought_classes, weights=rarity, minlength=num_classes)
    weight = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    weight = np.where(np.isnan(weight), np.nanmean(weight), weight)
    return np.minimum(weight / weight.mean(), cap)


def _draw_per_class(
    pool: np.ndarray,
    cand_classes: np.ndarray,
    log_weights: np.ndarray,
    n_select: int,
    num_classes: int,
    rng: np.random.Generator,
    class_share: np.ndarray | None = None,
) -> np.ndarray:
    """Per class, draw its quota without replacement with probability ∝ exp(log_weights).

    Gumbel-top-k: the quota largest keys log w_i + Gumbel_i are a sample without replacement
    that is distributed exactly like drawing one at a time ∝ w_i and removing it. Working on
    log weights means outliers whose w_i would underflow to 0 can still be drawn when a class
    has no other candidates left.
    """
    quotas = _class_quotas(np.bincount(cand_classes, minlength=num_classes), n_select, rng,
                           class_share)
    keys = log_weights + rng.gumbel(size=pool.size)
    # Within each class, order candidates by descending key; take the first `quota` of each.
    order = np.lexsort((-keys, cand_classes))
    sorted_classes = cand_classes[order]
    class_start = np.searchsorted(sorted_classes, np.arange(num_classes))
    rank_in_class = np.arange(order.size) - class_start[sorted_classes]
    picked = order[rank_in_class < quotas[sorted_classes]]
    return np.sort(pool[picked]).astype(np.int64)


# --- input validation ----------------------------------------------------------------------


def _check_latents(latents: np.ndarray) -> np.ndarray:
    latents = np.asarray(latents)
    if latents.ndim != 2:
        raise ValueError(
            f"latents must be 2-D (N images, D latent dims), got shape {latents.shape}; "
            "flatten each latent first, e.g. latents.reshape(len(latents), -1)."
        )
    if not (np.issubdtype(latents.dtype, np.floating) or np.issubdtype(latents.dtype, np.integer)):
        raise ValueError(f"latents must be real numbers, got dtype {latents.dtype}.")
    # Kept in their dtype (float16 latents of a large pool stay float16); checked in chunks.
    for start in range(0, latents.shape[0], 65536):
        if not np.all(np.isfinite(latents[start:start + 65536])):
            raise ValueError("latents contain NaN or inf; check the student encoder's outputs.")
    return latents


def _check_classes(classes: np.ndarray, n_rows: int, num_classes: int) -> np.ndarray:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
            or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
    classes = np.asarray(classes)
    if classes.shape != (n_rows,):
        raise ValueError(
            f"classes must have shape ({n_rows},), one class id per latent row, "
            f"got {classes.shape}."
        )
    if classes.size and not np.issubdtype(classes.dtype, np.integer):
        raise ValueError(
            f"classes must be integer class ids, got dtype {classes.dtype}; "
            "for probabilities pass their argmax, e.g. probs.argmax(1)."
        )
    classes = classes.astype(np.int64, copy=False)
    if classes.size and (classes.min() < 0 or classes.max() >= num_classes):
        raise ValueError(
            f"class ids must lie in [0, {num_classes}), got range "
            f"[{classes.min()}, {classes.max()}]; check num_classes."
        )
    return classes


def _check_sigma(sigma: float, sigma_mode: str) -> float:
    if sigma_mode not in SIGMA_MODES:
        raise ValueError(f"sigma_mode must be one of {SIGMA_MODES}, got {sigma_mode!r}.")
    try:
        sigma = float(sigma)
    except (TypeError, ValueError):
        raise ValueError(f"sigma must be a number, got {sigma!r}.") from None
    if not np.isfinite(sigma) or sigma <= 0:
        raise ValueError(
            f"sigma must be a finite number > 0, got {sigma}; the paper uses 17 (absolute), "
            "or use sigma_mode='median' with e.g. sigma=1."
        )
    return sigma


def _check_rng(rng: np.random.Generator) -> None:
    if not isinstance(rng, np.random.Generator):
        raise ValueError(
            f"rng must be a numpy.random.Generator, got {type(rng).__name__}; "
            "use np.random.default_rng(seed)."
        )


def _check_candidates(candidates: np.ndarray | None, n_rows: int) -> np.ndarray:
    """The candidate pool as sorted unique row indices (int64)."""
    if candidates is None:
        return np.arange(n_rows, dtype=np.int64)
    candidates = np.asarray(candidates)
    if candidates.dtype == bool:
        if candidates.shape != (n_rows,):
            raise ValueError(
                f"a boolean candidates mask must have shape ({n_rows},), got {candidates.shape}."
            )
        return np.flatnonzero(candidates).astype(np.int64)
    is_int = np.issubdtype(candidates.dtype, np.integer)
    if candidates.ndim != 1 or (candidates.size and not is_int):
        raise ValueError(
            "candidates must be a (N,) bool mask or a 1-D array of int row indices, "
            f"got shape {candidates.shape} dtype {candidates.dtype}."
        )
    candidates = candidates.astype(np.int64)
    if candidates.size and (candidates.min() < 0 or candidates.max() >= n_rows):
        raise ValueError(
            f"candidate indices must lie in [0, {n_rows}), got range "
            f"[{candidates.min()}, {candidates.max()}]."
        )
    unique = np.unique(candidates)
    if unique.size != candidates.size:
        raise ValueError("candidate indices contain duplicates; pass each row at most once.")
    return unique


def _check_n_select(n_select: int, n_candidates: int) -> None:
    if isinstance(n_select, bool) or not isinstance(n_select, (int, np.integer)) or n_select < 0:
        raise ValueError(f"n_select must be an int >= 0, got {n_select!r}.")
    if n_select > n_candidates:
        raise ValueError(
            f"n_select={n_select} exceeds the {n_candidates} candidates left in the pool; "
            "lower the round's budget or pass a larger candidate pool."
        )
