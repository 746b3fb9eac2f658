"""Plugging in another generator (GLIDE, a GAN, a web service...) by import path.

Set `generator.kind: plugin` and `generator.plugin: "package.module:factory"` (or
"/path/to/file.py:factory"). Every generator actor calls, once:

    factory(config: GeneratorConfig, class_names: tuple[str, ...], device: str) -> generator

and then, per batch:

    generator(prompts: list[str], class_ids: list[int], seeds: list[int])
        -> list of PIL images or uint8 arrays (H x W, H x W x 1 or H x W x 3), one per prompt

Images may have any size; they are resized to the victim's input size afterwards. Seed the
sampler from `seeds` (one per image) so the same config regenerates the same images. A GLIDE
plugin, for example, wraps the `glide_text2im` package:

    def glide(config, class_names, device):
        model, diffusion = ...   # glide_text2im.model_creation.create_model_and_diffusion
        def generate(prompts, class_ids, seeds):
            torch.manual_seed(seeds[0])       # or per-image noise from each seed
            samples = ...                     # classifier-free guided sampling of `prompts`
            return [((s + 1) * 127.5).clamp(0, 255).byte().permute(1, 2, 0).cpu().numpy()
                    for s in samples]
        return generate

The module must be importable on every Ray node (installed, or a file on shared storage).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path


def load_factory(spec: str) -> Callable:
    """Resolve 'package.module:factory' or '/path/to/file.py:factory' to the callable."""
    if not spec or ":" not in spec:
        raise ValueError(f"generator.plugin: got {spec!r}; expected 'package.module:factory' "
                         f"or '/path/to/file.py:factory'.")
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise ValueError(f"generator.plugin: got {spec!r}; expected 'package.module:factory'.")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ValueError(f"generator.plugin: {path} is not a file.")
        mod_spec = importlib.util.spec_from_file_location(f"aspkd_plugin_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ValueError(f"generator.plugin: cannot import {target!r} ({exc}); install it "
                             f"on every Ray node or give a file path.") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"generator.plugin: {target!r} has no callable {attr!r}.")
    return factory
