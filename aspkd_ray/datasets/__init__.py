"""Data sets: the embedded digits scenarios and the paper's real data sets."""

from aspkd_ray.datasets.sources import (
    DatasetUnavailable,
    ImageArrays,
    digits_split_indices,
    load_generator_data,
    load_victim_data,
)
from aspkd_ray.datasets.specs import SPECS, DatasetSpec, get_spec
from aspkd_ray.datasets.tensors import augment, png_decode, png_encode, to_tensor

__all__ = [
    "SPECS", "DatasetSpec", "DatasetUnavailable", "ImageArrays", "augment",
    "digits_split_indices", "get_spec", "load_generator_data", "load_victim_data",
    "png_decode", "png_encode", "to_tensor",
]
