import numpy as np

from aspkd_ray.datasets import (
    digits_split_indices,
    load_generator_data,
    load_victim_data,
    png_decode,
    png_encode,
    to_tensor,
)
from aspkd_ray.datasets.sources import DatasetUnavailable


def test_digits_splits_are_disjoint_stratified_and_stable():
    a = digits_split_indices()
    b = digits_split_indices()
    for part in a:
        np.testing.assert_array_equal(a[part], b[part])
    sets = {k: set(v.tolist()) for k, v in a.items()}
    assert not sets["victim"] & sets["generator"]
    assert not sets["victim"] & sets["test"]
    assert not sets["generator"] & sets["test"]
    train = load_victim_data("digits", "train")
    test = load_victim_data("digits", "test")
    gen = load_generator_data("digits")
    for part, n in ((train, 250), (test, 100), (gen, 150)):
        assert np.bincount(part.labels, minlength=10).tolist() == [n] * 10
        assert part.images.dtype == np.uint8 and part.images.shape[1:] == (28, 28, 1)


def test_split_content_does_not_depend_on_run_seed():
    # The split is a property of the scenario: a fingerprint of the test images stays fixed.
    test = load_victim_data("digits", "test")
    again = load_victim_data("digits-xdomain", "test")
    np.testing.assert_array_equal(test.images, again.images)


def test_xdomain_generator_data_is_sklearn_digits():
    gen = load_generator_data("digits-xdomain")
    assert gen.images.shape == (1797, 8, 8, 1) and gen.images.max() == 255


def test_offline_real_dataset_error_says_what_is_missing(tmp_path):
    import pytest

    with pytest.raises(DatasetUnavailable, match="dataset.root"):
        load_victim_data("cifar10", "test", root=str(tmp_path), download=False)
    with pytest.raises(DatasetUnavailable, match="label.csv"):
        load_victim_data("ferplus", "test", root=str(tmp_path))


def test_to_tensor_and_png_round_trip():
    gen = load_generator_data("digits-xdomain")
    x = to_tensor(gen.images[:4], 28, 1)
    assert x.shape == (4, 1, 28, 28) and 0 <= float(x.min()) and float(x.max()) <= 1
    img = gen.images[0]
    np.testing.assert_array_equal(png_decode(png_encode(img)), img)
