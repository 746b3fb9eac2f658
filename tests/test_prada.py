"""PRADA (aspkd_ray/audit/prada.py): an attacker's near-duplicate synthetic stream is flagged,
a benign stream of natural digits is not, and the ledger reader gives each client's queries
in the order they were asked. Seeded: every stream here is the same on every run."""

from __future__ import annotations

import numpy as np
import pytest

from aspkd_ray.audit import prada_detect, queries_from_ledger
from aspkd_ray.audit.prada import MIN_DISTANCES, audit_ledger, shapiro_w
from aspkd_ray.teacher import Ledger


@pytest.fixture(scope="module")
def digits():
    """MNIST-5k's held-out test split (1,000 natural digits) and its labels."""
    from aspkd_ray.datasets.sources import digits_split_indices, mnist5k

    x, y = mnist5k()
    test = digits_split_indices()["test"]
    return x[test], y[test]


def synthetic_stream(images, labels, n=300, seed=0):
    """An attacker's synthetic queries: two seed images of each of five classes, each query
    one of them plus small noise (0.5 to 8 grey levels of 255, log-uniform)."""
    rng = np.random.default_rng(seed)
    seeds = np.concatenate([rng.choice(np.flatnonzero(labels == c), 2, replace=False)
                            for c in rng.choice(10, 5, replace=False)])
    pick = seeds[rng.integers(0, len(seeds), n)]
    scale = np.exp(rng.uniform(np.log(0.5), np.log(8.0), n))[:, None, None, None]
    noisy = images[pick].astype(np.float64) + rng.normal(size=(n, *images.shape[1:])) * scale
    return np.clip(noisy, 0, 255), labels[pick]


def test_a_near_duplicate_synthetic_stream_is_flagged(digits):
    queries, classes = synthetic_stream(*digits)
    for result in (prada_detect(queries, classes), prada_detect(queries)):
        assert result.flagged
        # As soon as the test may run: the first query with min_distances distances.
        assert MIN_DISTANCES < result.calls_to_detection <= MIN_DISTANCES + 10
        assert result.w[result.calls_to_detection - 1] < result.delta
        assert np.isnan(result.w[:result.calls_to_detection - 1]).sum() >= MIN_DISTANCES - 1


def test_a_benign_stream_of_natural_digits_is_not_flagged(digits):
    images, labels = digits
    order = np.random.default_rng(1).permutation(len(images))[:300]
    per_class = prada_detect(images[order], labels[order])  # the paper's per-class sets
    assert not per_class.flagged and per_class.calls_to_detection is None
    assert np.nanmin(per_class.w) >= per_class.delta
    # One distance per query but the first of each class, W after each query from then on.
    assert len(per_class.distances) == 300 - len(np.unique(labels[order]))
    assert (~np.isnan(per_class.w)).sum() == len(per_class.distances) - MIN_DISTANCES + 1
    assert not prada_detect(images[order]).flagged  # class-agnostic too


def test_the_growing_set_keeps_only_far_apart_queries(digits):
    queries, classes = synthetic_stream(*digits)
    result = prada_detect(queries, classes)
    # Ten seed images: most near-duplicates stay below their class's threshold T_c.
    assert 10 <= result.growing_set <= len(queries) // 4


def test_exact_repeats_are_a_point_mass_and_are_flagged():
    x = np.random.default_rng(0).integers(0, 256, (3, 8, 8))
    stream = x[np.arange(80) % 3]
    result = prada_detect(stream)
    assert result.flagged and result.calls_to_detection == MIN_DISTANCES + 1
    assert shapiro_w(np.zeros(30)) == 0.0


def test_bad_arguments_are_refused():
    x = np.zeros((10, 4))
    with pytest.raises(ValueError, match="classes must have one entry per query"):
        prada_detect(x, np.zeros(9))
    with pytest.raises(ValueError, match="min_distances must be >= 3"):
        prada_detect(x, min_distances=2)
    with pytest.raises(ValueError, match="delta must be in"):
        prada_detect(x, delta=0)
    with pytest.raises(ValueError, match="N x"):
        prada_detect(np.zeros(10))


# ---- the ledger reader -------------------------------------------------------------------

def test_queries_from_ledger_gives_each_clients_stream_in_order(tmp_path):
    uri = str(tmp_path / "ledger")
    ledger = Ledger(uri, budget=20, output="soft", num_classes=3, writer="test")
    onehot = np.eye(3, dtype=np.float32)
    # Trial a buys s2, s0; trial b buys s5, is granted s0 free (a paid), then buys s1;
    # requests without a trial buy s9 (unanswered: the victim failed).
    ledger.reserve(["s2", "s0"], [1, 0], ["a", "a"], [True, True])
    ledger.record_answers(["s2", "s0"], onehot[[2, 0]])
    ledger.reserve(["s5", "s0"], [2, 0], ["b", "b"], [True, False])
    ledger.record_answers(["s5"], onehot[[1]])
    ledger.reserve(["s1"], [1], ["b"], [True])
    ledger.record_answers(["s1"], onehot[[1]])
    ledger.reserve(["s9"], [0], [""], [True])
    ledger.record_failure(["s9"], "ConnectionError: down")
    ledger.close()

    streams = queries_from_ledger(uri)
    assert set(streams) == {"a", "b", ""}
    a, b, solo = streams["a"], streams["b"], streams[""]
    assert a.ids == ["s2", "s0"] and a.classes.tolist() == [1, 0]
    assert a.predicted.tolist() == [2, 0] and a.charged.tolist() == [True, True]
    assert b.ids == ["s5", "s0", "s1"] and b.charged.tolist() == [True, False, True]
    assert b.predicted.tolist() == [1, 0, 1]  # the teacher's answers, argmax of soft labels
    assert solo.ids == ["s9"] and solo.predicted.tolist() == [-1]
    assert queries_from_ledger(uri, include_grants=False)["b"].ids == ["s5", "s1"]

    asked = []

    def load(ids):
        asked.append(list(ids))
        return np.stack([np.full((4, 4), int(i[1:]), np.uint8) for i in ids])

    results = audit_ledger(uri, load, min_distances=3)
    assert asked == [["s2", "s0"], ["s5", "s0", "s1"], ["s9"]]
    assert set(results) == {"a", "b", ""} and not results["a"].flagged


def test_queries_from_ledger_reads_hard_labels_and_refuses_a_missing_ledger(tmp_path):
    uri = str(tmp_path / "hard")
    ledger = Ledger(uri, budget=5, output="hard", num_classes=4, writer="test")
    ledger.reserve(["x", "y"], [3, 1], ["", ""], [True, True])
    ledger.record_answers(["x", "y"], np.array([2, 3]))
    ledger.close()
    stream = queries_from_ledger(uri)[""]
    assert stream.ids == ["x", "y"] and stream.predicted.tolist() == [2, 3]
    with pytest.raises(FileNotFoundError):
        queries_from_ledger(str(tmp_path / "none"))
