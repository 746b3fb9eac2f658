"""One factory for every generator kind, and the conversion to the victim's input format.

All generators follow one protocol (see plugin.py): called with prompts, class ids and seeds,
they return one image per prompt. `build_generator` asks the kind that `generator.kind` names
in the registry (registry.py) to build it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from aspkd_ray.config import Config
from aspkd_ray.generation.registry import Generator, get_generator

__all__ = ["Generator", "build_generator", "to_victim_format"]


def build_generator(cfg: Config, class_names: tuple[str, ...],
                    device: str | None = None) -> Generator:
    """The configured generator, loaded and ready to sample (called once per actor)."""
    return get_generator(cfg.generator.kind).build(cfg, tuple(class_names), device)


def to_victim_format(images: Sequence, size: int, channels: int,
                     frame: float | None = None) -> np.ndarray:
    """PIL images or uint8 arrays of any size → uint8 N x size x size x channels.

    Colour becomes grey with PIL's ITU-R 601 luma; grey is repeated into RGB. Resizing is
    bicubic (PIL antialiases when shrinking). `frame` (proxy.frame): the image is resized to
    that share of `size` and centred on black.
    """
    from PIL import Image

    out = np.empty((len(images), size, size, channels), dtype=np.uint8)
    for i, img in enumerate(images):
        if not isinstance(img, Image.Image):
            arr = np.asarray(img)
            if arr.dtype != np.uint8:
                raise TypeError(f"generator returned an image of dtype {arr.dtype}; expected "
                                f"uint8 arrays or PIL images.")
            if arr.ndim == 3 and arr.shape[-1] == 1:
                arr = arr[..., 0]
            img = Image.fromarray(arr)
        img = img.convert("L" if channels == 1 else "RGB")
        inner = size if frame is None else max(1, round(size * frame))
        if img.size != (inner, inner):
            img = img.resize((inner, inner), Image.BICUBIC)
        if inner != size:
            canvas = Image.new(img.mode, (size, size), 0)
            canvas.paste(img, ((size - inner) // 2, (size - inner) // 2))
            img = canvas
        arr = np.asarray(img, dtype=np.uint8)
        out[i] = arr[..., None] if arr.ndim == 2 else arr
    return out
