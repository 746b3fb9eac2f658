"""Teacher class-prior correction for proxy sets the victim sees as mostly one class.

A victim that meets proxy images unlike its training data can answer one class for most of
them (measured on digits-xdomain: the MNIST victim calls 86% of the 8x8-style proxy images
"8"). Distilling those answers teaches the student that bias, and the bias does not hold on
the victim's real data. The proxy set is balanced by generation class, so the teacher's
average answer over the bought set estimates its class prior π on the proxy domain; dividing
each soft label by π and renormalising (label-shift correction to a uniform prior) removes
the bias and keeps what distinguishes one image from another. Hard labels keep their ids;
the loss weighs class c by 1/π_c instead.

π is estimated from bought labels only, with one pseudo-count per class so a class the
teacher never answered is not amplified without bound.
"""

from __future__ import annotations

import numpy as np


def teacher_prior(bought_labels: np.ndarray, num_classes: int) -> np.ndarray:
    """π: the teacher's class prior over the bought set (soft N x C, or hard N ids), smoothed."""
    labels = np.asarray(bought_labels)
    if labels.ndim == 1:
        mass = np.bincount(labels.astype(np.int64), minlength=num_classes)[:num_classes]
    else:
        if labels.shape[1] != num_classes:
            raise ValueError(f"bought labels have {labels.shape[1]} classes, expected "
                             f"{num_classes}")
        mass = labels.astype(np.float64).sum(axis=0)
    return (mass + 1.0) / (len(labels) + num_classes)


def correct_soft_labels(labels: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """q / π, renormalised per row (float32 N x C)."""
    adjusted = np.asarray(labels, dtype=np.float64) / prior[None, :]
    return (adjusted / adjusted.sum(axis=1, keepdims=True)).astype(np.float32)


def class_weights(prior: np.ndarray) -> np.ndarray:
    """Loss weights 1/π_c for hard labels, scaled to average 1 over classes."""
    w = 1.0 / prior
    return (w / w.mean()).astype(np.float32)
