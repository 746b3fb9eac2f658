"""Any diffusers text-to-image pipeline (Stable Diffusion v2, SDXL, ...) by hub id or path.

`DiffusionPipeline.from_pretrained` picks the pipeline class from `model_index.json`, so one
code path serves SD v2, SDXL and any diffusers-format folder; the test suite drives it with a
tiny pipeline saved to a temporary folder, exactly as users pass a hub id.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from aspkd_ray.config import Config, ConfigError
from aspkd_ray.generation.registry import Generator, GeneratorKind, register_generator

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def scheduler_class(name: str):
    """The diffusers scheduler class for generator.scheduler ('default' keeps the model's)."""
    import diffusers

    names = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler",
             "dpm": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler"}
    if name == "default":
        return None
    if name not in names:
        raise ValueError(f"generator.scheduler: got {name!r}; expected one of: default, "
                         f"{', '.join(names)}.")
    return getattr(diffusers, names[name])


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"generator.dtype: got {name!r}; expected one of: {', '.join(DTYPES)}.")
    if device.type == "cpu" and name == "float16":
        # Half precision is slow or unsupported for many CPU kernels.
        log.warning("generator.dtype=float16 on a CPU: using float32 instead")
        return torch.float32
    return DTYPES[name]


def dtype_kwarg(dtype: torch.dtype) -> dict:
    """`dtype=` on diffusers versions that renamed `torch_dtype` (and warn about it)."""
    from diffusers.utils import deprecation_utils

    return {"dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype": dtype}


class DiffusersText2Image:
    """A diffusers text-to-image pipeline behind the generator protocol (plugin.py)."""

    def __init__(self, model: str, scheduler: str = "default", steps: int = 50,
                 guidance_scale: float = 7.5, resolution: int = 512, dtype: str = "float32",
                 device: str | None = None) -> None:
        from diffusers import DiffusionPipeline

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch_dtype = resolve_dtype(dtype, self.device)
        try:
            pipe = DiffusionPipeline.from_pretrained(model, **dtype_kwarg(torch_dtype))
        except (OSError, ValueError) as exc:
            raise FileNotFoundError(
                f"generator.model={model!r}: could not load a diffusers pipeline ({exc}). "
                f"Give a local folder written by save_pretrained, or a hub id on a machine "
                f"that reaches the hub (or has it in HF_HOME).") from None
        cls = scheduler_class(scheduler)
        if cls is not None:
            pipe.scheduler = cls.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(self.device)
        self.steps, self.guidance_scale, self.resolution = steps, guidance_scale, resolution

    @torch.no_grad()
    def __call__(self, prompts: list[str], class_ids: list[int],
                 seeds: list[int]) -> list[np.ndarray]:
        if not prompts:
            return []
        # One CPU generator per image: its noise depends on its seed only.
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        out = self.pipe(prompt=list(prompts), num_inference_steps=self.steps,
                        guidance_scale=self.guidance_scale, height=self.resolution,
                        width=self.resolution, generator=gens, output_type="np")
        images = np.asarray(out.images, dtype=np.float32)
        return list((images.clip(0.0, 1.0) * 255.0).round().astype(np.uint8))


@register_generator("diffusers")
class DiffusersKind(GeneratorKind):
    """generator.kind=diffusers: a text-to-image pipeline by hub id or local folder."""

    def validate(self, cfg: Config) -> None:
        if not cfg.generator.model:
            raise ConfigError("generator.model: required when generator.kind is 'diffusers'; "
                              "expected a hub id or a local pipeline folder.")

    def resolve(self, cfg: Config) -> Config:
        g = cfg.generator
        if Path(g.model).exists():  # a local folder; a hub id stays as it is
            return replace(cfg, generator=replace(g, model=str(Path(g.model).resolve())))
        return cfg

    def identity(self, cfg: Config) -> str:
        # A local folder by its base name, so a moved copy keeps its sample ids.
        model = cfg.generator.model
        return model.rstrip("/").split("/")[-1] if Path(model).exists() else model

    def build(self, cfg: Config, class_names: tuple[str, ...],
              device: str | None = None) -> Generator:
        g = cfg.generator
        return DiffusersText2Image(g.model, scheduler=g.scheduler, steps=g.steps,
                                   guidance_scale=g.guidance_scale, resolution=g.resolution,
                                   dtype=g.dtype, device=device)
