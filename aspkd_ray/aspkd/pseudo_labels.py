"""Self-paced pseudo-labels: kNN labelling of the unlabelled pool (Algorithm 1, steps 33-38).

Every round, each still-unlabelled proxy image (a *query*) gets a pseudo-label from its k nearest
teacher-labelled images (the *reference* set X') in the student's latent space S̄:

- soft teacher: the weighted average of the k neighbours' soft labels. Cosine distance
  Δcos = 1 - cos weighs a neighbour by (1 - Δcos) = cos (negative weights clipped to 0);
  Euclidean distance d weighs it by 1 / (d + eps). A nearer neighbour always weighs more.
- hard teacher: a plurality vote over the k neighbours' class ids. Tie-break: among the classes
  with the most votes, the one whose *nearest* member neighbour is closest to the query wins
  (distance, never similarity; for cosine the distance is 1 - cos). Should that still tie
  (equal distances), the smaller class id wins. Hard mode never produces or accepts
  probabilities.
- the generation-class filter: a query is dropped when its pseudo-label's class differs from
  the class its image was generated for (about 2% in the paper).

`knn_pseudo_labels` searches with faiss (batched, on GPU when there is one) and post-processes
all queries at once with numpy. `knn_pseudo_labels_reference` is the authors' way, one query at
a time in Python; it is kept as the oracle for tests and for scripts/bench_knn.py.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from aspkd_ray.registry import Registry


def _prefer_fast_openblas_kernel() -> None:
    """Help the OpenBLAS bundled with faiss-cpu pick the right kernel (before faiss loads it).

    The faiss-cpu wheel ships OpenBLAS 0.3.15, which does not recognise recent CPUs (e.g.
    Sapphire Rapids) and falls back to its generic "Prescott" kernel: flat search then runs
    about 4x slower (measured: 11 vs 47 GFLOPS). OPENBLAS_CORETYPE names the kernel, chosen
    here from the CPU's flags; it is read once, when the library loads, so it only helps if
    faiss was not imported yet. A value set by the user wins.
    """
    if "OPENBLAS_CORETYPE" in os.environ:
        return
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:  # not Linux: leave OpenBLAS to its own detection
        return
    if {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"} <= set(flags):
        os.environ["OPENBLAS_CORETYPE"] = "SkylakeX"
    elif {"avx2", "fma"} <= set(flags):
        os.environ["OPENBLAS_CORETYPE"] = "Haswell"


def load_faiss():
    """faiss, imported on first use (after the kernel choice above): naming a rule, or
    validating a config, needs no BLAS."""
    _prefer_fast_openblas_kernel()
    import faiss

    return faiss

DISTANCES = ("cosine", "euclidean")
MODES = ("soft", "hard")
# Added to a Euclidean distance before inverting it, so an exact duplicate (d = 0) gets a huge
# but finite weight.
INVERSE_DISTANCE_EPS = 1e-8
DEFAULT_BATCH_SIZE = 16384


@dataclass(frozen=True)
class PseudoLabels:
    """Pseudo-labels for every query (dropped ones included; use `kept` to filter).

    labels:      (Nq, C) float32 soft labels (rows sum to 1), or (Nq,) int64 hard class ids.
    classes:     (Nq,) int64 class of each pseudo-label (argmax, or the vote's winner).
    kept:        (Nq,) bool, False where the class differs from the generation class.
    filter_rate: share of queries dropped by the generation-class filter (0.0 without it).
    neighbours:  (Nq, k) int64 reference indices of the k nearest neighbours, nearest first.
    distances:   (Nq, k) float32 their distances (1 - cos, or Euclidean, not squared).
    """

    labels: np.ndarray
    classes: np.ndarray
    kept: np.ndarray
    filter_rate: float
    neighbours: np.ndarray
    distances: np.ndarray


# --- the registry: aspkd.pseudo_labels names a rule --------------------------------------


@dataclass(frozen=True)
class PseudoLabelInput:
    """What a rule may use to label the unlabelled pool X'' from the bought set X'."""

    query: np.ndarray               # (Nq, D) latents of the unlabelled images
    reference: np.ndarray           # (Nr, D) latents of the bought images
    reference_labels: np.ndarray    # the teacher's answers (soft: Nr x C, hard: Nr)
    generation_classes: np.ndarray  # (Nq,) class each query image was generated for
    mode: str                       # "soft" | "hard"
    num_classes: int
    distance: str                   # "cosine" | "euclidean"
    settings: object                # the aspkd config section (k, the filter, ...)
    # the student's class for each query, computed on demand (rules that need it call it)
    student_classes: Callable[[], np.ndarray] | None = None


Rule = Callable[[PseudoLabelInput], "PseudoLabels"]
RULES: Registry[Rule] = Registry("aspkd.pseudo_labels", builtins=("aspkd_ray.aspkd.variants",))
register_pseudo_labels = RULES.register   # @register_pseudo_labels("name") on a rule
list_pseudo_label_rules = RULES.names
get_pseudo_label_rule = RULES.get


def knn_pseudo_labels(
    query: np.ndarray,
    reference: np.ndarray,
    reference_labels: np.ndarray,
    *,
    k: int = 5,
    distance: str = "cosine",
    mode: str = "soft",
    num_classes: int,
    generation_classes: np.ndarray | None = None,
    filter_by_generation_class: bool = True,
    use_gpu: bool | None = None,
    batch_size: int | None = None,
) -> PseudoLabels:
    """Pseudo-label the unlabelled pool from its k nearest teacher-labelled neighbours (faiss).

    query:              (Nq, D) latents of the unlabelled images X''.
    reference:          (Nr, D) latents of the teacher-labelled images X'.
    reference_labels:   soft mode: (Nr, num_classes) float teacher probabilities;
                        hard mode: (Nr,) int teacher class ids.
    k:                  neighbours per query (the paper: 5); capped at Nr.
    distance:           "cosine" (the paper with soft labels) or "euclidean" (with hard ones).
    mode:               "soft" (weighted average) or "hard" (plurality vote).
    num_classes:        |C|.
    generation_classes: (Nq,) int class each query image was generated for, or None.
    filter_by_generation_class: drop queries whose pseudo-label class differs from it.
    use_gpu:            None = use a GPU index when faiss sees GPUs; False = always CPU.
    batch_size:         queries per faiss search (bounds the float32 copies); default 16384.
    """
    query, reference, reference_labels, generation_classes, k = _check_inputs(
        query, reference, reference_labels, k=k, distance=distance, mode=mode,
        num_classes=num_classes, generation_classes=generation_classes,
    )
    batch_size = _check_batch_size(batch_size)
    use_gpu = _resolve_use_gpu(use_gpu)

    distances, neighbours = _faiss_knn(query, reference, k, distance, use_gpu, batch_size)
    if mode == "soft":
        labels = _soft_labels(distances, reference_labels[neighbours], distance)
        classes = labels.argmax(axis=1).astype(np.int64)
    else:
        classes = _hard_vote(distances, reference_labels[neighbours], num_classes)
        labels = classes
    kept, filter_rate = _generation_filter(classes, generation_classes, filter_by_generation_class)
    return PseudoLabels(labels, classes, kept, filter_rate, neighbours, distances)


def knn_pseudo_labels_reference(
    query: np.ndarray,
    reference: np.ndarray,
    reference_labels: np.ndarray,
    *,
    k: int = 5,
    distance: str = "cosine",
    mode: str = "soft",
    num_classes: int,
    generation_classes: np.ndarray | None = None,
    filter_by_generation_class: bool = True,
) -> PseudoLabels:
    """The authors' way: one query at a time, distances to the whole labelled set, sort, take k.

    Same arguments and result as `knn_pseudo_labels` (without the faiss options). Its weighting
    and vote are written independently, per query, so it can serve as an oracle. Slow: only for
    tests and the benchmark.
    """
    query, reference, reference_labels, generation_classes, k = _check_inputs(
        query, reference, reference_labels, k=k, distance=distance, mode=mode,
        num_classes=num_classes, generation_classes=generation_classes,
    )
    if distance == "cosine":
        reference = _l2_normalise(reference)
    n_query = query.shape[0]
    neighbours = np.zeros((n_query, k), dtype=np.int64)
    distances = np.zeros((n_query, k), dtype=np.float32)
    labels = (np.zeros((n_query, num_classes), dtype=np.float32) if mode == "soft"
              else np.zeros(n_query, dtype=np.int64))

    for i in range(n_query):
        if distance == "cosine":
            q = _l2_normalise(query[i:i + 1])[0]
            d = 1.0 - reference @ q
        else:
            d = np.sqrt(((reference - query[i]) ** 2).sum(axis=1))
        nearest = np.argsort(d, kind="stable")[:k]
        neighbours[i], distances[i] = nearest, d[nearest]

        if mode == "soft":
            if distance == "cosine":
                w = [max(1.0 - float(d[j]), 0.0) for j in nearest]
                if sum(w) == 0.0:
                    w = [1.0] * k
            else:
                w = [1.0 / (float(d[j]) + INVERSE_DISTANCE_EPS) for j in nearest]
            label = sum(wj * reference_labels[j].astype(np.float64)
                        for wj, j in zip(w, nearest, strict=True))
            labels[i] = label / label.sum()
        else:
            votes: dict[int, int] = {}
            closest: dict[int, float] = {}
            for j in nearest:
                c = int(reference_labels[j])
                votes[c] = votes.get(c, 0) + 1
                closest[c] = min(closest.get(c, np.inf), float(d[j]))
            labels[i] = min(votes, key=lambda c: (-votes[c], closest[c], c))

    classes = labels.argmax(axis=1).astype(np.int64) if mode == "soft" else labels
    kept, filter_rate = _generation_filter(classes, generation_classes, filter_by_generation_class)
    return PseudoLabels(labels, classes, kept, filter_rate, neighbours, distances)


# --- the batched kNN search ----------------------------------------------------------------


def _faiss_knn(
    query: np.ndarray,
    reference: np.ndarray,
    k: int,
    distance: str,
    use_gpu: bool,
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(distances, neighbours), each (Nq, k), nearest first, by exact (flat) faiss search.

    Cosine: inner product of L2-normalised vectors, distance 1 - cos.
    Euclidean: faiss's L2 index returns squared distances; the square root is taken here.
    """
    faiss = load_faiss()
    dim = reference.shape[1]
    if distance == "cosine":
        index = faiss.IndexFlatIP(dim)
        index.add(_l2_normalise(reference))
    else:
        index = faiss.IndexFlatL2(dim)
        index.add(np.ascontiguousarray(reference, dtype=np.float32))
    if use_gpu:
        index = faiss.index_cpu_to_all_gpus(index)

    n_query = query.shape[0]
    distances = np.empty((n_query, k), dtype=np.float32)
    neighbours = np.empty((n_query, k), dtype=np.int64)
    for start in range(0, n_query, batch_size):
        batch = query[start:start + batch_size]
        batch = (_l2_normalise(batch) if distance == "cosine"
                 else np.ascontiguousarray(batch, dtype=np.float32))
        scores, ids = index.search(batch, k)
        distances[start:start + len(batch)] = scores
        neighbours[start:start + len(batch)] = ids

    if distance == "cosine":
        distances = np.clip(1.0 - distances, 0.0, 2.0)  # rounding can push |cos| past 1
    else:
        distances = np.sqrt(np.maximum(distances, 0.0))  # rounding can give tiny negatives
    return distances.astype(np.float32), neighbours


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32, contiguous); an all-zero row stays zero (cos = 0)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, np.finfo(np.float32).tiny))


def _resolve_use_gpu(use_gpu: bool | None) -> bool:
    if use_gpu is not None and not isinstance(use_gpu, (bool, np.bool_)):
        raise ValueError(f"use_gpu must be True, False or None, got {use_gpu!r}.")
    has_gpu = load_faiss().get_num_gpus() > 0
    if use_gpu and not has_gpu:
        warnings.warn(
            "use_gpu=True but faiss sees no GPU (faiss-cpu build, or no device); "
            "searching on CPU. Install faiss-gpu to search on GPU.",
            RuntimeWarning, stacklevel=3,
        )
    return bool(has_gpu and use_gpu is not False)


# --- from neighbours to pseudo-labels (all queries at once) --------------------------------


def _soft_labels(distances: np.ndarray, neighbour_labels: np.ndarray, distance: str) -> np.ndarray:
    """Weighted average of the neighbours' soft labels (Nq, k, C) -> (Nq, C), rows sum to 1.

    Weights fall with distance: (1 - Δcos) clipped at 0 for cosine (a row of all zeros, i.e.
    no neighbour with positive cosine, falls back to equal weights), 1 / (d + eps) for Euclidean.
    """
    d = distances.astype(np.float64)
    if distance == "cosine":
        weights = np.clip(1.0 - d, 0.0, None)
        weights[weights.sum(axis=1) == 0.0] = 1.0
    else:
        weights = 1.0 / (d + INVERSE_DISTANCE_EPS)
    labels = np.einsum("qk,qkc->qc", weights, neighbour_labels.astype(np.float64))
    return (labels / labels.sum(axis=1, keepdims=True)).astype(np.float32)


def _hard_vote(
    distances: np.ndarray, neighbour_classes: np.ndarray, num_classes: int,
) -> np.ndarray:
    """Plurality vote (Nq, k) -> (Nq,) int64; ties go to the class with the nearest member.

    votes[q, c]:   how many of q's neighbours have class c.
    closest[q, c]: distance from q to its nearest neighbour of class c (inf if none).
    Among the classes with the most votes, argmin of `closest` wins; np.argmin's first-index
    rule settles equal distances in favour of the smaller class id.
    """
    n_query, k = neighbour_classes.shape
    rows = np.repeat(np.arange(n_query), k)
    flat = rows * num_classes + neighbour_classes.ravel()
    votes = np.bincount(flat, minlength=n_query * num_classes).reshape(n_query, num_classes)
    closest = np.full(n_query * num_classes, np.inf)
    np.minimum.at(closest, flat, distances.ravel().astype(np.float64))
    closest = closest.reshape(n_query, num_classes)
    is_top = votes == votes.max(axis=1, keepdims=True)
    return np.where(is_top, closest, np.inf).argmin(axis=1).astype(np.int64)


def _generation_filter(
    classes: np.ndarray, generation_classes: np.ndarray | None, enabled: bool,
) -> tuple[np.ndarray, float]:
    """(kept, filter_rate): keep a query only if its pseudo-label class is its generation class."""
    if not enabled or generation_classes is None:
        return np.ones(classes.shape[0], dtype=bool), 0.0
    kept = classes == generation_classes
    return kept, float(1.0 - kept.mean()) if kept.size else 0.0


# --- input validation ----------------------------------------------------------------------


def _check_inputs(query, reference, reference_labels, *, k, distance, mode, num_classes,
                  generation_classes):
    """Validated (query, reference, reference_labels, generation_classes, k capped at Nr)."""
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}.")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
            or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an int >= 1 (the paper uses 5), got {k!r}.")

    query = _check_latents("query", query)
    reference = _check_latents("reference", reference)
    if reference.shape[0] == 0:
        raise ValueError("reference is empty: pseudo-labels need at least one teacher-labelled "
                         "image; run selection and query the teacher first.")
    if query.shape[1] != reference.shape[1]:
        raise ValueError(
            f"query and reference latents must have the same dimension, got {query.shape[1]} "
            f"and {reference.shape[1]}; embed both with the same student encoder."
        )
    n_ref = reference.shape[0]

    labels = np.asarray(reference_labels)
    if mode == "hard":
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"mode='hard' takes (Nr,) int class ids, got shape {labels.shape} dtype "
                f"{labels.dtype}; hard mode never consumes probabilities. Use the hard "
                "teacher's class ids, or mode='soft' for a soft teacher's probabilities."
            )
        if labels.shape[0] != n_ref:
            raise ValueError(f"reference_labels has {labels.shape[0]} rows, reference {n_ref}.")
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(
                f"hard reference labels must lie in [0, {num_classes}), got range "
                f"[{labels.min()}, {labels.max()}]; check num_classes."
            )
        labels = labels.astype(np.int64, copy=False)
    else:
        if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.floating):
            raise ValueError(
                f"mode='soft' takes (Nr, {num_classes}) float probabilities, got shape "
                f"{labels.shape} dtype {labels.dtype}; for a hard teacher's class ids use "
                "mode='hard'."
            )
        if labels.shape != (n_ref, num_classes):
            raise ValueError(
                f"reference_labels must have shape ({n_ref}, {num_classes}) (one probability "
                f"row per reference latent), got {labels.shape}."
            )
        if not np.all(np.isfinite(labels)) or labels.min() < 0 or \
                np.any(labels.sum(axis=1) <= 0):
            raise ValueError("soft reference labels must be finite, >= 0, with a positive sum "
                             "per row (teacher probabilities).")

    if generation_classes is not None:
        generation_classes = np.asarray(generation_classes)
        is_int = np.issubdtype(generation_classes.dtype, np.integer)
        if generation_classes.shape != (query.shape[0],) or (generation_classes.size
                                                            and not is_int):
            raise ValueError(
                f"generation_classes must be ({query.shape[0]},) int class ids, one per query, "
                f"got shape {generation_classes.shape} dtype {generation_classes.dtype}."
            )
        generation_classes = generation_classes.astype(np.int64, copy=False)
    return query, reference, labels, generation_classes, int(min(k, n_ref))


def _check_latents(name: str, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D (N, D latent dims), got shape {x.shape}; "
            f"flatten each latent first, e.g. {name}.reshape(len({name}), -1)."
        )
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{name} must be real numbers, got dtype {x.dtype}.")
    # float16 latents of a large pool stay float16: each search batch is cast to float32.
    if not np.issubdtype(x.dtype, np.floating) or x.dtype == np.float64:
        x = x.astype(np.float32)
    for start in range(0, len(x), 65536):  # checked in chunks: no pool-sized temporary
        if not np.all(np.isfinite(x[start:start + 65536])):
            raise ValueError(f"{name} contains NaN or inf; check the student encoder's "
                             f"outputs.")
    return x


def _check_batch_size(batch_size: int | None) -> int:
    if batch_size is None:
        return DEFAULT_BATCH_SIZE
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1 or None, got {batch_size!r}.")
    return int(batch_size)


@register_pseudo_labels("paper")
def _paper(inp: PseudoLabelInput) -> PseudoLabels:
    """The paper's rule: k nearest bought neighbours (weighted average or vote), dropped when
    the label's class differs from the generation class."""
    a = inp.settings
    return knn_pseudo_labels(inp.query, inp.reference, inp.reference_labels, k=a.k,
                             distance=inp.distance, mode=inp.mode, num_classes=inp.num_classes,
                             generation_classes=inp.generation_classes,
                             filter_by_generation_class=a.generation_class_filter)
