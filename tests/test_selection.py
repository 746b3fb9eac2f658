"""Active selection and the random (vanilla) baseline: quotas, without-replacement, Eq. (2)."""

from __future__ import annotations

import numpy as np
import pytest

from aspkd_ray.aspkd.selection import active_select, random_select


def _blobs(sizes: dict[int, int], dim: int = 8, seed: int = 0):
    """Latents and classes with `sizes[c]` rows of class c (any ids, any sizes), shuffled."""
    rng = np.random.default_rng(seed)
    classes = np.concatenate([np.full(n, c) for c, n in sizes.items()])
    rng.shuffle(classes)
    latents = rng.standard_normal((classes.size, dim)) + 5.0 * classes[:, None]
    return latents, classes


def _check_basic(result, classes, candidates, n_select):
    """Invariants of every selection: no duplicates, only candidates, counts add up."""
    assert result.indices.dtype == np.int64
    assert result.indices.size == n_select
    assert np.unique(result.indices).size == n_select, "an image was picked twice"
    assert np.isin(result.indices, candidates).all(), "a non-candidate was picked"
    assert np.array_equal(result.per_class, np.bincount(classes[result.indices],
                                                        minlength=result.per_class.size))


@pytest.mark.parametrize("select", ["active", "random"])
def test_equal_counts_per_class_without_replacement(select):
    latents, classes = _blobs({c: 40 + 7 * c for c in range(5)})  # unbalanced, all large enough
    rng = np.random.default_rng(1)
    if select == "active":
        result = active_select(latents, classes, 50, 5, sigma=1.0, sigma_mode="median", rng=rng)
    else:
        result = random_select(classes, 50, 5, rng=rng)
    _check_basic(result, classes, np.arange(classes.size), 50)
    assert result.per_class.tolist() == [10] * 5


def test_taking_a_whole_pool_picks_every_candidate_once():
    latents, classes = _blobs({0: 7, 1: 3, 2: 5})
    candidates = np.array([0, 2, 3, 5, 8, 9, 11, 14])
    result = active_select(latents, classes, candidates.size, 3, sigma=17.0,
                           rng=np.random.default_rng(0), candidates=candidates)
    assert result.indices.tolist() == candidates.tolist()


def test_only_candidates_are_picked_and_weighted():
    latents, classes = _blobs({0: 30, 1: 30, 2: 30})
    mask = np.zeros(classes.size, dtype=bool)
    mask[::3] = True
    for seed in range(20):
        result = active_select(latents, classes, 15, 3, sigma=1.0, sigma_mode="median",
                               rng=np.random.default_rng(seed), candidates=mask)
        _check_basic(result, classes, np.flatnonzero(mask), 15)
        assert np.all(result.weights[~mask] == 0) and np.all(result.weights[mask] > 0)


def test_weights_follow_eq2_with_candidate_centroids():
    # One class on a line: candidates at 0, 1, 3 (centroid 4/3); a far non-candidate at 100
    # must not move the centroid.
    latents = np.array([[0.0], [1.0], [3.0], [100.0]])
    classes = np.zeros(4, dtype=int)
    sigma = 0.8
    result = active_select(latents, classes, 1, 1, sigma=sigma, rng=np.random.default_rng(0),
                           candidates=np.array([0, 1, 2]))
    delta = np.abs(latents[:3, 0] - 4.0 / 3.0)
    expected = np.exp(-delta / (2 * sigma**2))  # Δ not squared, as in the paper
    assert result.weights[:3] == pytest.approx(expected / expected.max())
    assert result.weights[3] == 0.0
    assert result.sigma == sigma


def test_median_mode_scales_sigma_by_the_median_distance():
    latents = np.array([[0.0], [8.0], [10.0], [18.0]])  # class 0 at 0, 8; class 1 at 10, 18
    classes = np.array([0, 0, 1, 1])
    result = active_select(latents, classes, 2, 2, sigma=3.0, sigma_mode="median",
                           rng=np.random.default_rng(0))
    assert result.sigma == pytest.approx(3.0 * 2.0)  # every Δ is 4: σ² = 3² × 4


def test_median_mode_weights_do_not_depend_on_the_latent_scale():
    rng = np.random.default_rng(3)
    latents = rng.normal(size=(60, 8))
    classes = np.arange(60) % 3
    small = active_select(latents, classes, 6, 3, sigma=0.5, sigma_mode="median",
                          rng=np.random.default_rng(0))
    large = active_select(latents * 100.0, classes, 6, 3, sigma=0.5, sigma_mode="median",
                          rng=np.random.default_rng(0))
    np.testing.assert_allclose(small.weights, large.weights, rtol=1e-9)
    np.testing.assert_array_equal(small.indices, large.indices)


def test_picks_are_drawn_proportionally_to_p():
    # Class 0: two near points (Δ = 0.2) and two outliers (Δ = 2); centroid 0, σ = 1.
    # With one pick, P(pick i) = p_i / Σ p exactly.
    latents = np.array([[-0.2], [0.2], [-2.0], [2.0]])
    classes = np.zeros(4, dtype=int)
    p = np.exp(-np.abs(latents[:, 0]) / 2.0)
    expected = p / p.sum()
    trials = 3000
    counts = np.zeros(4)
    for seed in range(trials):
        result = active_select(latents, classes, 1, 1, sigma=1.0, rng=np.random.default_rng(seed))
        counts[result.indices] += 1
    freq = counts / trials
    se = np.sqrt(expected * (1 - expected) / trials)
    assert np.all(np.abs(freq - expected) < 5 * se), (freq, expected)
    assert freq[:2].sum() > 0.65  # near points clearly favoured (uniform would be 0.5)


def test_random_select_is_uniform_within_a_class():
    classes = np.zeros(4, dtype=int)
    counts = np.zeros(4)
    trials = 2000
    for seed in range(trials):
        counts[random_select(classes, 1, 1, rng=np.random.default_rng(seed)).indices] += 1
    se = np.sqrt(0.25 * 0.75 / trials)
    assert np.all(np.abs(counts / trials - 0.25) < 5 * se)


def test_weights_do_not_underflow_for_huge_distances():
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((60, 4)) * 1e6
    classes = np.repeat([0, 1, 2], 20)
    result = active_select(latents, classes, 30, 3, sigma=1e-3, rng=rng)
    assert np.all(np.isfinite(result.weights)) and result.weights.max() == 1.0
    assert result.per_class.tolist() == [10, 10, 10]
    _check_basic(result, classes, np.arange(60), 30)


@pytest.mark.parametrize("select", ["active", "random"])
def test_shortfall_of_small_and_absent_classes_is_redistributed(select):
    # Non-contiguous ids {0, 3, 7} of 10 classes; class 0 has only 2 candidates.
    latents, classes = _blobs({0: 2, 3: 20, 7: 20})

    def run(n, seed):
        rng = np.random.default_rng(seed)
        if select == "active":
            return active_select(latents, classes, n, 10, sigma=17.0, rng=rng)
        return random_select(classes, n, 10, rng=rng)

    result = run(12, 0)
    _check_basic(result, classes, np.arange(classes.size), 12)
    assert result.per_class.tolist() == [2, 0, 0, 5, 0, 0, 0, 5, 0, 0]
    # An odd shortfall: 13 = 2 + 11 -> 6/5 or 5/6, the extra one to a random class.
    extra_to_3 = sum(run(13, seed).per_class[3] == 6 for seed in range(200))
    assert 60 < extra_to_3 < 140
    for seed in range(20):
        counts = run(13, seed).per_class
        assert counts[0] == 2 and sorted(counts[[3, 7]].tolist()) == [5, 6]


def test_remainder_is_not_biased_to_low_class_ids():
    # 13 picks from 10 classes: 1 each + 3 extra; each class should get an extra 30% of the time.
    latents, classes = _blobs({c: 5 for c in range(10)})
    trials = 1500
    extras = np.zeros(10)
    for seed in range(trials):
        result = active_select(latents, classes, 13, 10, sigma=17.0,
                               rng=np.random.default_rng(seed))
        assert set(result.per_class.tolist()) == {1, 2}
        extras += result.per_class == 2
    se = np.sqrt(trials * 0.3 * 0.7)
    assert np.all(np.abs(extras - 0.3 * trials) < 5 * se), extras


def test_same_seed_same_picks_other_seed_other_picks():
    latents, classes = _blobs({c: 50 for c in range(4)})

    def run(seed):
        return active_select(latents, classes, 20, 4, sigma=1.0, sigma_mode="median",
                             rng=np.random.default_rng(seed))

    assert np.array_equal(run(7).indices, run(7).indices)
    assert not np.array_equal(run(7).indices, run(8).indices)


def test_zero_picks():
    latents, classes = _blobs({0: 3})
    result = active_select(latents, classes, 0, 1, sigma=1.0, rng=np.random.default_rng(0))
    assert result.indices.size == 0 and result.per_class.tolist() == [0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_select": 61}, "exceeds the 60 candidates"),
        ({"n_select": 5, "candidates": np.arange(4)}, "exceeds the 4 candidates"),
        ({"sigma": 0.0}, "sigma must be a finite number > 0"),
        ({"sigma": -1.0}, "sigma must be a finite number > 0"),
        ({"sigma_mode": "mean"}, "sigma_mode must be one of"),
        ({"classes": np.zeros(59, dtype=int)}, r"classes must have shape \(60,\)"),
        ({"classes": np.zeros(60)}, "integer class ids"),
        ({"classes": np.full(60, 3)}, r"class ids must lie in \[0, 3\)"),
        ({"latents": np.zeros(60)}, "latents must be 2-D"),
        ({"latents": np.full((60, 2), np.nan)}, "NaN or inf"),
        ({"candidates": np.ones(59, dtype=bool)}, r"mask must have shape \(60,\)"),
        ({"candidates": np.array([0, 0, 1])}, "duplicates"),
        ({"candidates": np.array([60])}, r"must lie in \[0, 60\)"),
        ({"rng": 0}, "numpy.random.Generator"),
        ({"n_select": -1}, "n_select must be an int >= 0"),
    ],
)
def test_invalid_input_is_explained(kwargs, message):
    args = {"latents": np.zeros((60, 2)), "classes": np.repeat([0, 1, 2], 20), "n_select": 6,
            "num_classes": 3, "sigma": 1.0, "rng": np.random.default_rng(0)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        active_select(args.pop("latents"), args.pop("classes"), args.pop("n_select"),
                      args.pop("num_classes"), **args)


def test_random_select_rejects_too_many_picks():
    with pytest.raises(ValueError, match="exceeds the 3 candidates"):
        random_select(np.array([0, 1, 1]), 4, 2, rng=np.random.default_rng(0))
