"""Pseudo-label rules and selection strategies beyond the paper, registered beside its own.

`aspkd.pseudo_labels: confident` keeps what the teacher said: the paper's kNN labels, with k
bounded by the bought images per class (k = 5 over 2 references a class must average in
other classes), sharpened (p^(1/T), argmax unchanged), dropped where the neighbours disagree
(`pl_min_confidence`), optionally where the student disagrees (`pl_student_agreement`), and
capped per class so one class cannot flood X'' (`pl_class_cap`).

Selection strategies keep the paper's per-class quotas (by generation class) and change
what is picked inside a class:
- `kcenter`: diversity, k-center greedy in S̄: each pick is the candidate farthest from
  every image already bought or picked;
- `margin` / `entropy`: the student's uncertainty, the smallest top-2 probability margin or
  the largest entropy first;
- `margin_kcenter`: both, k-center greedy among the 3 × quota most uncertain of the class.
"""

from __future__ import annotations

import math

import numpy as np

from aspkd_ray.aspkd.pseudo_labels import (
    PseudoLabelInput,
    PseudoLabels,
    get_pseudo_label_rule,
    knn_pseudo_labels,
    register_pseudo_labels,
)
from aspkd_ray.aspkd.selection import (
    SelectionInput,
    SelectionResult,
    _class_quotas,
    register_selection,
)


def bounded_k(k: int, n_reference: int, num_classes: int) -> int:
    """k, at most the bought images per class (at least 1)."""
    return max(1, min(k, n_reference // max(num_classes, 1)))


def sharpen(labels: np.ndarray, temperature: float) -> np.ndarray:
    """Soft labels p^(1/T), renormalised: T < 1 sharpens, T = 1 changes nothing, and the
    argmax never changes."""
    if temperature <= 0:
        raise ValueError(f"aspkd.pl_temperature: got {temperature}; expected > 0.")
    logp = np.log(np.clip(labels.astype(np.float64), 1e-12, None)) / temperature
    p = np.exp(logp - logp.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def confidence(pl: PseudoLabels, reference_labels: np.ndarray, mode: str) -> np.ndarray:
    """How much the neighbours agree: the top averaged probability (soft), or the share of
    the k neighbours that voted for the winning class (hard)."""
    if mode == "soft":
        return pl.labels.max(axis=1).astype(np.float64)
    votes = reference_labels[pl.neighbours] == pl.classes[:, None]
    return votes.mean(axis=1)


def cap_per_class(classes: np.ndarray, score: np.ndarray, kept: np.ndarray,
                  ratio: float, num_classes: int) -> np.ndarray:
    """`kept`, with each class limited to ceil(ratio × mean kept per class) images, the
    highest `score` first."""
    counts = np.bincount(classes[kept], minlength=num_classes)
    cap = math.ceil(ratio * counts.sum() / num_classes)
    out = kept.copy()
    for c in np.flatnonzero(counts > cap):
        members = np.flatnonzero(kept & (classes == c))
        drop = members[np.argsort(-score[members], kind="stable")[cap:]]
        out[drop] = False
    return out


@register_pseudo_labels("confident")
def _confident(inp: PseudoLabelInput) -> PseudoLabels:
    """kNN labels with k bounded per class, sharpened, kept where the neighbours agree (and
    the student, with pl_student_agreement), at most pl_class_cap × the mean per class."""
    a = inp.settings
    k = bounded_k(a.k, len(inp.reference), inp.num_classes)
    pl = knn_pseudo_labels(inp.query, inp.reference, inp.reference_labels, k=k,
                           distance=inp.distance, mode=inp.mode, num_classes=inp.num_classes,
                           generation_classes=inp.generation_classes,
                           filter_by_generation_class=a.generation_class_filter)
    score = confidence(pl, inp.reference_labels, inp.mode)
    kept = pl.kept & (score >= a.pl_min_confidence)
    if a.pl_student_agreement and inp.student_classes is not None:
        kept &= pl.classes == inp.student_classes()
    if a.pl_class_cap is not None:
        kept = cap_per_class(pl.classes, score, kept, a.pl_class_cap, inp.num_classes)
    labels = sharpen(pl.labels, a.pl_temperature) if inp.mode == "soft" else pl.labels
    rate = float(1.0 - kept.mean()) if kept.size else 0.0
    return PseudoLabels(labels, pl.classes, kept, rate, pl.neighbours, pl.distances)


def kcenter_greedy(latents: np.ndarray, candidates: np.ndarray, centres: np.ndarray,
                   n: int) -> np.ndarray:
    """n candidates (row ids), each the one farthest from all centres and earlier picks."""
    cand = latents[candidates].astype(np.float64)
    if len(centres):
        gap = _nearest_sq_distance(cand, latents[centres].astype(np.float64))
    else:  # nothing bought yet: start from the candidate nearest the mean
        gap = np.full(len(cand), np.inf)
        first = int(np.argmin(((cand - cand.mean(0)) ** 2).sum(1)))
        gap[first] = np.finfo(np.float64).max
    picks = []
    for _ in range(min(n, len(cand))):
        i = int(np.argmax(gap))
        picks.append(i)
        gap = np.minimum(gap, ((cand - cand[i]) ** 2).sum(1))
        gap[picks] = -1.0  # never again
    return candidates[np.asarray(picks, dtype=np.int64)]


def uncertainty(probabilities: np.ndarray, kind: str) -> np.ndarray:
    """Higher = less sure: 1 − (top-1 − top-2 probability), or the entropy."""
    p = probabilities.astype(np.float64)
    if kind == "margin":
        top2 = np.sort(p, axis=1)[:, -2:]
        return 1.0 - (top2[:, 1] - top2[:, 0])
    if kind == "entropy":
        return -(p * np.log(np.clip(p, 1e-12, None))).sum(1)
    raise ValueError(f"uncertainty kind: got {kind!r}; expected 'margin' or 'entropy'.")


def _per_class(inp: SelectionInput, pick) -> SelectionResult:
    """The paper's class quotas; `pick(class members, quota)` chooses inside each class."""
    n = len(inp.classes)
    cand = np.asarray(inp.candidates, dtype=np.int64)
    cand_classes = inp.classes[cand]
    quotas = _class_quotas(np.bincount(cand_classes, minlength=inp.num_classes), inp.quota,
                           inp.rng, inp.class_share)
    picks = [pick(cand[cand_classes == c], int(q)) for c, q in enumerate(quotas) if q]
    indices = np.sort(np.concatenate(picks)).astype(np.int64) if picks else \
        np.zeros(0, np.int64)
    weights = np.zeros(n)
    weights[indices] = 1.0
    return SelectionResult(indices, weights,
                           np.bincount(inp.classes[indices], minlength=inp.num_classes),
                           float("nan"))


def _most_uncertain(inp: SelectionInput, members: np.ndarray, n: int,
                    score: np.ndarray) -> np.ndarray:
    """The n members with the highest score; ties broken at random (inp.rng)."""
    order = np.lexsort((inp.rng.random(len(members)), -score[members]))
    return members[order[:n]]


def _needs_probabilities(inp: SelectionInput, name: str) -> np.ndarray:
    if inp.probabilities is None:
        raise ValueError(f"aspkd.selection={name} needs the student's probabilities; this "
                         f"pool does not give them (Pool.predict_proba).")
    return inp.probabilities()


@register_selection("margin")
def _margin(inp: SelectionInput) -> SelectionResult:
    """Per class, the candidates whose top-2 student probabilities are closest."""
    score = uncertainty(_needs_probabilities(inp, "margin"), "margin")
    return _per_class(inp, lambda m, q: _most_uncertain(inp, m, q, score))


@register_selection("entropy")
def _entropy(inp: SelectionInput) -> SelectionResult:
    """Per class, the candidates whose student prediction has the most entropy."""
    score = uncertainty(_needs_probabilities(inp, "entropy"), "entropy")
    return _per_class(inp, lambda m, q: _most_uncertain(inp, m, q, score))


@register_selection("margin_kcenter")
def _margin_kcenter(inp: SelectionInput) -> SelectionResult:
    """Per class, k-center greedy among the 3 × quota candidates of smallest margin."""
    score = uncertainty(_needs_probabilities(inp, "margin_kcenter"), "margin")
    latents = inp.latents()
    bought = np.setdiff1d(np.arange(len(inp.classes)), inp.candidates)
    return _per_class(inp, lambda m, q: kcenter_greedy(
        latents, _most_uncertain(inp, m, 3 * q, score), bought, q))


def _nearest_sq_distance(a: np.ndarray, b: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """For each row of a, the squared Euclidean distance to its nearest row of b, by
    ||a||² + ||b||² − 2ab in chunks of b (no N_a x N_b x D temporary)."""
    a2 = (a ** 2).sum(1)
    best = np.full(len(a), np.inf)
    for start in range(0, len(b), chunk):
        part = b[start:start + chunk]
        d = a2[:, None] + (part ** 2).sum(1)[None] - 2.0 * a @ part.T
        best = np.minimum(best, np.clip(d, 0.0, None).min(1))
    return best


@register_selection("kcenter")
def _kcenter(inp: SelectionInput) -> SelectionResult:
    """The paper's per-class quotas; inside a class, k-center greedy in S̄ from everything
    bought so far (the rows that are not candidates)."""
    latents = inp.latents()
    bought = np.setdiff1d(np.arange(len(inp.classes)), inp.candidates)
    return _per_class(inp, lambda m, q: kcenter_greedy(latents, m, bought, q))


@register_pseudo_labels("adaptive")
def _adaptive(inp: PseudoLabelInput) -> PseudoLabels:
    """The `confident` rule while fewer than k images per class are bought (the paper's k
    nearest neighbours would then average in other classes), the paper's rule from then
    on."""
    if len(inp.reference) < inp.settings.k * inp.num_classes:
        return _confident(inp)
    return get_pseudo_label_rule("paper")(inp)
