"""Validation of what goes to the victim and of what comes back.

A charged answer is never silently dropped or repaired: a malformed one raises InvalidAnswer,
and the service records its samples as reserved-but-unanswered.
"""

from __future__ import annotations

import numpy as np

from aspkd_ray.teacher.errors import InvalidAnswer

# Probabilities from float32 softmax over many classes sum to 1 within ~1e-6; HTTP JSON
# round trips and fp16 servers lose more. Anything past this is not a probability vector.
SUM_TOLERANCE = 1e-3


def check_answer(answer: object, n: int, num_classes: int, output: str) -> np.ndarray:
    """Return the victim's answer for `n` samples as float32 N x C (soft) or int64 N (hard).

    Raises InvalidAnswer naming what is wrong. A hard answer must be class ids; probabilities
    are rejected there, so hard mode can never pass probabilities on.
    """
    try:
        arr = np.asarray(answer)
    except (ValueError, TypeError) as exc:
        raise InvalidAnswer(f"victim answer is not an array: {exc}") from exc
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number)
                                   or arr.dtype == np.bool_):
        raise InvalidAnswer(f"victim answer has non-numeric values (dtype {arr.dtype}).")
    if output == "soft":
        return _check_soft(arr, n, num_classes)
    if output == "hard":
        return _check_hard(arr, n, num_classes)
    raise ValueError(f"output must be 'soft' or 'hard', got {output!r}.")


def _check_soft(arr: np.ndarray, n: int, num_classes: int) -> np.ndarray:
    if arr.ndim != 2 or arr.shape != (n, num_classes):
        raise InvalidAnswer(f"soft victim answered shape {arr.shape} for {n} samples; expected "
                            f"({n}, {num_classes}) probabilities.")
    probs = arr.astype(np.float64)
    if not np.isfinite(probs).all():
        bad = int((~np.isfinite(probs)).any(1).sum())
        raise InvalidAnswer(f"victim answer has NaN or infinite probabilities in {bad} rows.")
    if (probs < 0).any():
        raise InvalidAnswer(f"victim answer has negative probabilities (min {probs.min():.3g}).")
    sums = probs.sum(1)
    off = np.abs(sums - 1.0) > SUM_TOLERANCE
    if off.any():
        raise InvalidAnswer(f"victim answer rows are not normalised: {int(off.sum())} of {n} "
                            f"rows sum to {sums[off][0]:.6g} (first), not 1.")
    return probs.astype(np.float32)


def _check_hard(arr: np.ndarray, n: int, num_classes: int) -> np.ndarray:
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1 or arr.shape[0] != n:
        raise InvalidAnswer(f"hard victim answered shape {arr.shape} for {n} samples; expected "
                            f"({n},) class ids.")
    if arr.dtype == np.bool_:
        raise InvalidAnswer("hard victim answered booleans, not class ids.")
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.isfinite(arr).all() or (arr != np.round(arr)).any():
            raise InvalidAnswer("hard victim answered non-integer values; expected class ids "
                                "(a hard-label victim never returns probabilities).")
    ids = arr.astype(np.int64)
    bad = (ids < 0) | (ids >= num_classes)
    if bad.any():
        raise InvalidAnswer(f"victim answered unknown class ids {sorted(set(ids[bad].tolist()))[:5]}"
                            f"; expected 0..{num_classes - 1}.")
    return ids


def check_request(ids: object, classes: object, images: object,
                  num_classes: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Validate a buy request; return (ids as str list, classes int64, images uint8 NHWC)."""
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__len__"):
        raise TypeError(f"ids must be a list of sample id strings, got {type(ids).__name__}.")
    ids = list(ids)
    for i in ids:
        if not isinstance(i, (str, np.str_)) or not i:
            raise TypeError(f"sample ids must be non-empty strings, got {i!r}; proxy ids are "
                            f"strings derived from (generator, class, template, seed).")
    ids = [str(i) for i in ids]
    cls = np.asarray(classes)
    if cls.ndim != 1 or len(cls) != len(ids):
        raise ValueError(f"classes must be 1-D with one generation class per id: got shape "
                         f"{cls.shape} for {len(ids)} ids.")
    if len(cls) and not np.issubdtype(cls.dtype, np.integer):
        raise TypeError(f"classes must be integers, got dtype {cls.dtype}.")
    cls = cls.astype(np.int64)
    if len(cls) and ((cls < 0) | (cls >= num_classes)).any():
        raise ValueError(f"classes must be in 0..{num_classes - 1}, got "
                         f"{sorted(set(cls[(cls < 0) | (cls >= num_classes)].tolist()))[:5]}.")
    img = np.asarray(images)
    if img.dtype != np.uint8:
        raise TypeError(f"images must be uint8 N x H x W x C, got dtype {img.dtype}.")
    if img.ndim == 3:
        img = img[..., None]
    if img.ndim != 4 or img.shape[0] != len(ids) or img.shape[-1] not in (1, 3):
        raise ValueError(f"images must be uint8 N x H x W x C (C = 1 or 3) with N = {len(ids)} "
                         f"ids, got shape {img.shape}.")
    return ids, cls, img
