"""The shapes plugin (a cheap generator for scale tests): deterministic per seed, varied
across seeds, separable by class, small PNGs, and a proxy set made through Ray with it."""

from __future__ import annotations

import numpy as np
import pytest

from aspkd_ray.config import from_dict
from aspkd_ray.datasets import png_encode
from aspkd_ray.generation.shapes import KINDS, class_style, draw_image, shapes

pytestmark = pytest.mark.timeout(300)

PLUGIN = "aspkd_ray.generation.shapes:shapes"


def _generator(resolution: int, num_classes: int = 6):
    cfg = from_dict({"generator": {"kind": "plugin", "plugin": PLUGIN,
                                   "resolution": resolution}})
    return shapes(cfg.generator, tuple(f"class{k}" for k in range(num_classes)), "cpu")


@pytest.mark.parametrize("resolution", [224, 8, 37])
def test_images_are_rgb_uint8_at_the_generation_resolution(resolution):
    images = _generator(resolution)(["a", "b", "c"], [0, 3, 5], [1, 2, 3])
    assert len(images) == 3
    for img in images:
        assert isinstance(img, np.ndarray)
        assert img.shape == (resolution, resolution, 3) and img.dtype == np.uint8


def test_the_same_seeds_give_the_same_bytes_whatever_the_batch():
    classes, seeds = [0, 1, 2, 5], [11, 2**62 + 7, 0, 11]
    first = _generator(64)(["p"] * 4, classes, seeds)
    again = _generator(64)(["other prompts"] * 4, classes, seeds)  # a new actor, say
    alone = _generator(64)(["p"], classes[1:2], seeds[1:2])  # another batching
    assert [a.tobytes() for a in first] == [b.tobytes() for b in again]
    assert alone[0].tobytes() == first[1].tobytes()


def test_different_seeds_give_different_images():
    seeds = list(range(100, 130))
    images = _generator(32)([""] * len(seeds), [2] * len(seeds), seeds)
    assert len({img.tobytes() for img in images}) == len(seeds)
    # Not only the noise differs: the shape moves (its saturated pixels' centroid).
    centres = {tuple(np.round(np.argwhere(_saturated(img)).mean(axis=0))) for img in images}
    assert len(centres) > len(seeds) // 2


def _saturated(img: np.ndarray) -> np.ndarray:
    """Pixels with HSV saturation above 0.5: the shape (the background stays below)."""
    rgb = img.astype(np.float64)
    mx, mn = rgb.max(axis=-1), rgb.min(axis=-1)
    return (mx - mn) > 0.5 * np.maximum(mx, 1.0)


def _colour(img: np.ndarray) -> np.ndarray:
    """Chromaticity (r, g, b) / (r + g + b) of the shape's pixels."""
    pixels = img[_saturated(img)].astype(np.float64)
    assert len(pixels) > 0, "no shape pixels found"
    mean = pixels.mean(axis=0)
    return mean / mean.sum()


def test_classes_are_separable_by_the_shape_colour():
    num_classes, per_class = 6, 12
    gen = _generator(32, num_classes)
    classes = [c for c in range(num_classes) for _ in range(per_class)]

    def features(seed_offset: int) -> np.ndarray:
        seeds = [seed_offset + i for i in range(len(classes))]
        return np.stack([_colour(img) for img in gen([""] * len(classes), classes, seeds)])

    labels = np.asarray(classes)
    fit = features(0)
    centroids = np.stack([fit[labels == c].mean(axis=0) for c in range(num_classes)])
    held_out = features(10_000)  # other seeds
    dist = ((held_out[:, None, :] - centroids[None, :, :]) ** 2).sum(axis=-1)
    accuracy = (dist.argmin(axis=1) == labels).mean()
    assert accuracy >= 0.95, accuracy


@pytest.mark.parametrize("num_classes", [2, 10, 200])
def test_every_class_has_its_own_style(num_classes):
    styles = [class_style(c, num_classes) for c in range(num_classes)]
    assert len(set(styles)) == num_classes
    # Classes sharing a kind are at least 1 / ceil(num_classes / len(KINDS)) apart in hue
    # (cyclically: hue 0.95 is close to hue 0); all hues differ.
    step = 1 / -(-num_classes // len(KINDS))
    for a in range(num_classes):
        for b in range(a + 1, num_classes):
            gap = abs(styles[a][1] - styles[b][1])
            assert gap > 0
            if styles[a][0] == styles[b][0]:
                assert min(gap, 1 - gap) >= step - 1e-9, (a, b)
    with pytest.raises(ValueError, match="outside"):
        class_style(num_classes, num_classes)


def test_pngs_at_224_are_small():
    sizes = [len(png_encode(draw_image(224, c % 10, 10, 1000 + c))) for c in range(30)]
    assert np.mean(sizes) < 20_000, np.mean(sizes)


def test_a_proxy_set_of_shapes_through_ray(ray_session, tmp_path):
    from aspkd_ray.generation import generate_proxy, load_proxy_set
    from aspkd_ray.generation.backends import to_victim_format

    root = tmp_path / "data"
    for name in ("cat", "dog"):  # an image folder's classes are its sub-folders
        (root / "train" / name).mkdir(parents=True)
    cfg = from_dict({
        "seed": 3, "cache_dir": str(tmp_path / "cache"),
        "dataset": {"name": "imagefolder", "root": str(root), "image_size": 16,
                    "channels": 3},
        "generator": {"kind": "plugin", "plugin": PLUGIN, "resolution": 24,
                      "batch_size": 4},
        "proxy": {"per_class": 6, "val_fraction": 0.2}})
    manifest = generate_proxy(cfg, tmp_path / "out", shard_size=5)
    assert manifest["num_samples"] == 12 and manifest["class_names"] == ["cat", "dog"]
    ps = load_proxy_set(tmp_path / "out" / "proxy")
    assert ps.images.shape == (12, 16, 16, 3) and ps.images.dtype == np.uint8
    assert np.bincount(ps.classes).tolist() == [6, 6]
    # Each stored image is the plugin's image of its row's class and seed, resized (24 → 16)
    # for the victim: the class ids and seeds reached the plugin unchanged.
    expected = to_victim_format([draw_image(24, int(c), 2, int(s))
                                 for c, s in zip(ps.classes, ps.seeds, strict=True)], 16, 3)
    np.testing.assert_array_equal(ps.images, expected)
