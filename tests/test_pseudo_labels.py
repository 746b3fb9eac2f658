"""Self-paced kNN pseudo-labels: weighting, vote tie-break, hard/soft separation, the filter,
and the faiss path against the authors' per-query loop."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from aspkd_ray.aspkd.pseudo_labels import knn_pseudo_labels, knn_pseudo_labels_reference

BOTH = [knn_pseudo_labels, knn_pseudo_labels_reference]


def _on_unit_circle(degrees):
    rad = np.deg2rad(np.asarray(degrees, dtype=float))
    return np.stack([np.cos(rad), np.sin(rad)], axis=1).astype(np.float32)


# --- soft labels: nearer neighbours weigh more ---------------------------------------------


@pytest.mark.parametrize("knn", BOTH)
def test_soft_cosine_leans_to_the_nearer_neighbour(knn):
    # Query at 0°; neighbour A (class 0) at 10°, neighbour B (class 1) at 60°.
    reference = _on_unit_circle([10, 60])
    soft = np.array([[0.9, 0.1], [0.1, 0.9]], dtype=np.float32)
    out = knn(_on_unit_circle([0]), reference, soft, k=2, distance="cosine", num_classes=2)
    w = np.cos(np.deg2rad([10, 60]))  # 1 - Δcos
    expected = (w @ soft) / w.sum()
    assert out.labels[0] == pytest.approx(expected, abs=1e-5)
    assert out.labels[0, 0] > 0.6 and out.classes[0] == 0
    assert out.distances[0] == pytest.approx(1 - w, abs=1e-6)


@pytest.mark.parametrize("knn", BOTH)
def test_soft_euclidean_leans_to_the_nearer_neighbour(knn):
    # Query at 0; neighbour A (class 0) at distance 1, neighbour B (class 1) at distance 3.
    reference = np.array([[1.0, 0.0], [0.0, 3.0]], dtype=np.float32)
    soft = np.array([[0.8, 0.2], [0.2, 0.8]], dtype=np.float32)
    out = knn(np.zeros((1, 2), np.float32), reference, soft, k=2, distance="euclidean",
              num_classes=2)
    w = 1.0 / np.array([1.0, 3.0])
    expected = (w @ soft) / w.sum()
    assert out.labels[0] == pytest.approx(expected, abs=1e-5)
    assert out.labels[0, 0] > 0.6 and out.classes[0] == 0
    assert out.distances[0] == pytest.approx([1.0, 3.0])  # not squared


@pytest.mark.parametrize("knn", BOTH)
def test_soft_cosine_clips_negative_weights_and_falls_back_to_uniform(knn):
    soft = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], dtype=np.float32)
    # Query 0°: neighbours at 45° (class 0, w=cos45) and 135° (class 1, cos<0 -> w=0).
    out = knn(_on_unit_circle([0]), _on_unit_circle([45, 135]), soft[:2], k=2, num_classes=2)
    assert out.labels[0] == pytest.approx([1.0, 0.0], abs=1e-6)
    # Query 180°: both neighbours at cos <= 0 -> equal weights.
    out = knn(_on_unit_circle([180]), _on_unit_circle([0, 90]), soft[:2], k=2, num_classes=2)
    assert out.labels[0] == pytest.approx([0.5, 0.5], abs=1e-6)


# --- hard labels: plurality vote, ties to the nearer class ---------------------------------


@pytest.mark.parametrize("knn", BOTH)
@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_hard_tie_goes_to_the_class_with_the_nearest_neighbour(knn, distance):
    # k = 4, votes 2-2: class 1 owns the nearest neighbour (10°). Class 0 (20°, 30°) would win
    # by the smaller class id, by summed distance, or by reading similarity as distance.
    reference = _on_unit_circle([10, 20, 30, 40])
    hard = np.array([1, 0, 0, 1])
    query = _on_unit_circle([0])
    out = knn(query, reference, hard, k=4, distance=distance, mode="hard", num_classes=2)
    assert out.labels.tolist() == [1] and out.classes.tolist() == [1]
    # And with the classes swapped, the other way round.
    out = knn(query, reference, 1 - hard, k=4, distance=distance, mode="hard", num_classes=2)
    assert out.labels.tolist() == [0]


@pytest.mark.parametrize("knn", BOTH)
@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_hard_plurality_beats_proximity(knn, distance):
    # The nearest neighbour is class 2, but class 0 has 2 of 3 votes.
    reference = _on_unit_circle([5, 30, 40])
    out = knn(_on_unit_circle([0]), reference, np.array([2, 0, 0]), k=3, distance=distance,
              mode="hard", num_classes=3)
    assert out.labels.tolist() == [0]


@pytest.mark.parametrize("knn", BOTH)
def test_hard_mode_neither_returns_nor_accepts_probabilities(knn):
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((20, 4)).astype(np.float32)
    query = rng.standard_normal((7, 4)).astype(np.float32)
    hard = rng.integers(0, 3, 20)
    out = knn(query, reference, hard, mode="hard", distance="euclidean", num_classes=3)
    assert out.labels.shape == (7,) and out.labels.dtype == np.int64
    assert np.array_equal(out.labels, out.classes)
    probs = np.eye(3, dtype=np.float32)[hard]
    with pytest.raises(ValueError, match="hard mode never consumes probabilities"):
        knn(query, reference, probs, mode="hard", num_classes=3)
    with pytest.raises(ValueError, match="hard mode never consumes probabilities"):
        knn(query, reference, hard.astype(np.float32), mode="hard", num_classes=3)
    with pytest.raises(ValueError, match="for a hard teacher's class ids use mode='hard'"):
        knn(query, reference, hard, mode="soft", num_classes=3)


# --- the generation-class filter -----------------------------------------------------------


@pytest.mark.parametrize("knn", BOTH)
def test_filter_drops_exactly_the_mismatches(knn):
    reference = np.array([[0.0, 0.0], [10.0, 0.0]], dtype=np.float32)
    hard = np.array([0, 1])
    query = np.array([[0.1, 0], [9.9, 0], [0.2, 0], [10.1, 0]], dtype=np.float32)  # -> 0 1 0 1
    generation = np.array([0, 0, 1, 1])
    out = knn(query, reference, hard, k=1, distance="euclidean", mode="hard", num_classes=2,
              generation_classes=generation)
    assert out.classes.tolist() == [0, 1, 0, 1]
    assert out.kept.tolist() == [True, False, False, True]
    assert out.filter_rate == pytest.approx(0.5)
    off = knn(query, reference, hard, k=1, distance="euclidean", mode="hard", num_classes=2,
              generation_classes=generation, filter_by_generation_class=False)
    assert off.kept.all() and off.filter_rate == 0.0
    assert knn(query, reference, hard, k=1, mode="hard", num_classes=2).kept.all()


# --- the faiss path agrees with the authors' loop ------------------------------------------


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_faiss_path_matches_the_per_query_loop(distance, mode):
    rng = np.random.default_rng(42)
    query = rng.standard_normal((400, 24)).astype(np.float32)
    reference = rng.standard_normal((300, 24)).astype(np.float32)
    labels = (rng.dirichlet(np.full(6, 0.3), 300).astype(np.float32) if mode == "soft"
              else rng.integers(0, 6, 300))
    generation = rng.integers(0, 6, 400)
    kwargs = dict(k=5, distance=distance, mode=mode, num_classes=6, generation_classes=generation)
    fast = knn_pseudo_labels(query, reference, labels, batch_size=64, **kwargs)
    slow = knn_pseudo_labels_reference(query, reference, labels, **kwargs)
    assert np.array_equal(fast.neighbours, slow.neighbours)
    np.testing.assert_allclose(fast.distances, slow.distances, rtol=1e-5, atol=1e-5)
    if mode == "soft":
        assert fast.labels.shape == (400, 6) and fast.labels.dtype == np.float32
        np.testing.assert_allclose(fast.labels, slow.labels, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(fast.labels.sum(1), 1.0, rtol=1e-5)
    else:
        assert np.array_equal(fast.labels, slow.labels)
    assert np.array_equal(fast.classes, slow.classes)
    assert np.array_equal(fast.kept, slow.kept)
    assert fast.filter_rate == slow.filter_rate == pytest.approx(1 - np.mean(fast.classes
                                                                             == generation))


def test_k_is_capped_at_the_reference_size_and_empty_queries_work():
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((3, 4)).astype(np.float32)
    out = knn_pseudo_labels(rng.standard_normal((5, 4)), reference, np.array([0, 1, 1]), k=5,
                            mode="hard", num_classes=2)
    assert out.neighbours.shape == (5, 3) and out.distances.shape == (5, 3)
    empty = knn_pseudo_labels(np.zeros((0, 4)), reference, np.array([0, 1, 1]), mode="hard",
                              num_classes=2)
    assert empty.labels.shape == (0,) and empty.filter_rate == 0.0


def test_gpu_index_is_used_when_faiss_sees_a_gpu(monkeypatch):
    cloned = []

    def fake_to_gpus(index):
        cloned.append(index)
        return index  # stand-in: the CPU index answers like a GPU clone would

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", fake_to_gpus)
    rng = np.random.default_rng(0)
    args = (rng.standard_normal((10, 4)), rng.standard_normal((8, 4)), rng.integers(0, 2, 8))
    knn_pseudo_labels(*args, mode="hard", num_classes=2)
    assert len(cloned) == 1
    knn_pseudo_labels(*args, mode="hard", num_classes=2, use_gpu=False)
    assert len(cloned) == 1


@pytest.mark.skipif(faiss.get_num_gpus() > 0, reason="needs a machine without GPUs")
def test_asking_for_a_gpu_without_one_warns_and_uses_cpu():
    rng = np.random.default_rng(0)
    with pytest.warns(RuntimeWarning, match="faiss sees no GPU"):
        out = knn_pseudo_labels(rng.standard_normal((4, 3)), rng.standard_normal((6, 3)),
                                rng.integers(0, 2, 6), mode="hard", num_classes=2, use_gpu=True)
    assert out.labels.shape == (4,)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"distance": "manhattan"}, "distance must be one of"),
        ({"mode": "argmax"}, "mode must be one of"),
        ({"k": 0}, "k must be an int >= 1"),
        ({"num_classes": 0}, "num_classes must be a positive int"),
        ({"query": np.zeros((3, 5))}, "same dimension"),
        ({"query": np.zeros(4)}, "query must be 2-D"),
        ({"reference": np.zeros((0, 4))}, "reference is empty"),
        ({"reference_labels": np.full((6, 2), 0.5, np.float32)}, r"shape \(6, 3\)"),
        ({"reference_labels": np.full((6, 3), -1.0, np.float32)}, ">= 0"),
        ({"generation_classes": np.zeros(2, dtype=int)}, r"generation_classes must be \(3,\)"),
        ({"batch_size": 0}, "batch_size must be an int >= 1"),
    ],
)
def test_invalid_input_is_explained(kwargs, message):
    args = {"query": np.zeros((3, 4)), "reference": np.ones((6, 4)),
            "reference_labels": np.full((6, 3), 1 / 3, np.float32), "num_classes": 3}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        knn_pseudo_labels(args.pop("query"), args.pop("reference"), args.pop("reference_labels"),
                          **args)


def test_euclidean_weight_stays_finite_for_an_exact_duplicate():
    # 1/(d + eps) with d = 0: the duplicate dominates, nothing becomes inf or NaN.
    reference = np.array([[0.0, 0.0], [1.0, 0.0]], dtype=np.float32)
    soft = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    out = knn_pseudo_labels(np.zeros((1, 2)), reference, soft, k=2, distance="euclidean",
                            num_classes=2)
    assert np.all(np.isfinite(out.labels)) and out.labels[0, 0] > 1 - 1e-6
