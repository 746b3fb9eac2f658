"""One factory for every generator kind, and the conversion to the victim's input format.

All generators follow one protocol (see plugin.py): called with prompts, class ids and seeds,
they return one image per prompt. `build_generator` picks the kind from the config.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from aspkd_ray.config import Config

Generator = Callable[[list[str], list[int], list[int]], Sequence]


def build_generator(cfg: Config, class_names: tuple[str, ...],
                    device: str | None = None) -> Generator:
    """The configured generator, loaded and ready to sample (called once per actor)."""
    g = cfg.generator
    if g.kind == "ddpm":
        import torch

        from aspkd_ray.generation.ddpm import DDPMGenerator
        from aspkd_ray.generation.text2image import DTYPES
        from aspkd_ray.generation.train_ddpm import generator_dir

        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = DTYPES[g.dtype] if dev.type == "cuda" else torch.float32
        gen = DDPMGenerator(generator_dir(cfg), scheduler=g.scheduler, steps=g.steps,
                            device=str(dev), dtype=dtype)
        if gen.num_classes != len(class_names):
            raise ValueError(f"the generator at {generator_dir(cfg)} has {gen.num_classes} "
                             f"classes; the data set has {len(class_names)}.")
        return gen
    if g.kind == "diffusers":
        from aspkd_ray.generation.text2image import DiffusersText2Image

        return DiffusersText2Image(g.model, scheduler=g.scheduler, steps=g.steps,
                                   guidance_scale=g.guidance_scale, resolution=g.resolution,
                                   dtype=g.dtype, device=device)
    if g.kind == "plugin":
        import torch

        from aspkd_ray.generation.plugin import load_factory

        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return load_factory(g.plugin)(g, tuple(class_names), dev)
    raise ValueError(f"generator.kind: got {g.kind!r}; expected ddpm, diffusers or plugin.")


def to_victim_format(images: Sequence, size: int, channels: int) -> np.ndarray:
    """PIL images or uint8 arrays of any size → uint8 N x size x size x channels.

    Colour becomes grey with PIL's ITU-R 601 luma; grey is repeated into RGB. Resizing is
    bicubic (PIL antialiases when shrinking).
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
        if img.size != (size, size):
            img = img.resize((size, size), Image.BICUBIC)
        arr = np.asarray(img, dtype=np.uint8)
        out[i] = arr[..., None] if arr.ndim == 2 else arr
    return out
