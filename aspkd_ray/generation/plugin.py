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
from dataclasses import replace
from pathlib import Path

from aspkd_ray.config import Config, ConfigError
from aspkd_ray.generation.registry import Generator, GeneratorKind, register_generator


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


def check_plugin_spec(spec: str) -> None:
    """'package.module:factory' or '/path/to/file.py:factory' (the file is checked when the
    proxy set is generated: a Tune trial may validate this config on another node)."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target.strip() or not attr.strip() or not attr.isidentifier():
        raise ConfigError(f"generator.plugin: got {spec!r}; expected 'package.module:factory' "
                          f"or '/path/to/file.py:factory'.")


def check_plugin(spec: str) -> None:
    """Fail early, in the driver and before Ray starts, when generator.plugin cannot load:
    a missing or unparsable .py file, or a module that is not installed. Runs none of the
    plugin's code (a file is only compiled; a module is only looked up)."""
    target, _, attr = spec.rpartition(":")
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_file():
            raise ConfigError(f"generator.plugin: got {spec!r}, but {path} is not a file; "
                              f"expected '/path/to/file.py:factory' or "
                              f"'package.module:factory'.")
        try:
            compile(path.read_bytes(), str(path), "exec")
        except (SyntaxError, ValueError) as exc:
            raise ConfigError(f"generator.plugin: {path} is not valid Python ({exc}); fix "
                              f"the file.") from None
        return
    try:
        found = importlib.util.find_spec(target)
    except (ImportError, ValueError) as exc:  # a parent package is missing or broken
        found, why = None, f"{type(exc).__name__}: {exc}"
    else:
        why = "no such module"
    if found is None:
        raise ConfigError(f"generator.plugin: got {spec!r}, but module {target!r} cannot be "
                          f"imported ({why}); install it on every Ray node, or give "
                          f"'/path/to/file.py:{attr or 'factory'}'.")


@register_generator("plugin")
class PluginKind(GeneratorKind):
    """generator.kind=plugin: any generator behind the factory protocol above."""

    def validate(self, cfg: Config) -> None:
        if not cfg.generator.plugin:
            raise ConfigError("generator.plugin: required when generator.kind is 'plugin'; "
                              "expected 'package.module:factory'.")
        check_plugin_spec(cfg.generator.plugin)

    def check(self, cfg: Config) -> None:
        check_plugin(cfg.generator.plugin)

    def resolve(self, cfg: Config) -> Config:
        target, _, attr = cfg.generator.plugin.rpartition(":")
        if target.endswith(".py"):  # actors run in other folders
            plugin = f"{Path(target).resolve()}:{attr}"
            return replace(cfg, generator=replace(cfg.generator, plugin=plugin))
        return cfg

    def identity(self, cfg: Config) -> str:
        return cfg.generator.plugin

    def build(self, cfg: Config, class_names: tuple[str, ...],
              device: str | None = None) -> Generator:
        import torch

        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return load_factory(cfg.generator.plugin)(cfg.generator, tuple(class_names), dev)
