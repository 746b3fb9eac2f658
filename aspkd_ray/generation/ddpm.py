"""The embedded scenarios' generator: a small class-conditional DDPM in diffusers format.

It stands in for Stable Diffusion where no model hub is reachable: a `UNet2DModel` with class
embeddings (no attention, ~1 M parameters at 32/64/64 channels) trained with `DDPMScheduler`
noise, sampled with DDIM (or another scheduler). The folder is a plain `DDPMPipeline`
(`model_index.json`, `unet/`, `scheduler/`) plus `aspkd_generator.json` (classes, channels,
training record), so diffusers tools open it too.

The prompt is not used: the class id is the condition, as the prompt's class name is for a
text-to-image model.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import numpy as np
import torch

INFO_FILE = "aspkd_generator.json"
MARKER = "model_index.json"  # published last: on object storage, the folder is complete
NUM_TRAIN_TIMESTEPS = 1000
BETA_SCHEDULE = "squaredcos_cap_v2"  # the cosine schedule suits tiny 16 x 16 images better
# v-prediction: with epsilon-prediction, the x0 estimate at the noisiest steps (where the cosine
# schedule leaves almost no signal) is amplified ~1/sqrt(alpha_bar) and deterministic samplers
# (DDIM, DPM, Euler) drift into noise; v stays well-scaled at every step.
PREDICTION_TYPE = "v_prediction"


def build_unet(num_classes: int, channels: int, resolution: int,
               block_channels: list[int] | tuple[int, ...]):
    """A class-conditional UNet2DModel: one ResNet layer per block, no attention."""
    from diffusers import UNet2DModel

    blocks = tuple(int(c) for c in block_channels)
    if not blocks or min(blocks) < 1:
        raise ValueError(f"generator.training.block_channels: got {list(block_channels)}; "
                         f"expected a non-empty list of positive integers, e.g. [32, 64, 64].")
    factor = 2 ** (len(blocks) - 1)
    if resolution % factor:
        raise ValueError(f"generator.resolution: got {resolution}; with {len(blocks)} UNet "
                         f"blocks it must be divisible by {factor}.")
    return UNet2DModel(
        sample_size=resolution, in_channels=channels, out_channels=channels,
        block_out_channels=blocks, layers_per_block=1,
        down_block_types=("DownBlock2D",) * len(blocks),
        up_block_types=("UpBlock2D",) * len(blocks),
        add_attention=False, num_class_embeds=num_classes,
        norm_num_groups=min(32, math.gcd(*blocks)),  # must divide every block's width
    )


def train_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule=BETA_SCHEDULE,
                         prediction_type=PREDICTION_TYPE, clip_sample=True)


def sampling_scheduler(name: str, train_config: dict):
    """The configured scheduler, built from the training scheduler's config."""
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
    )

    classes = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "dpm": DPMSolverMultistepScheduler,
               "euler": EulerDiscreteScheduler, "default": DDIMScheduler}
    if name not in classes:
        raise ValueError(f"generator.scheduler: got {name!r}; expected one of: "
                         f"{', '.join(classes)}.")
    # Trailing spacing starts sampling at the last training step, i.e. from pure noise.
    return classes[name].from_config(train_config, timestep_spacing="trailing")


def read_info(folder: str | Path) -> dict:
    path = Path(folder) / INFO_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def is_ready(folder: str | Path) -> bool:
    """A complete generator folder: the pipeline files, and (when ours) marked complete.
    On object storage (a URI): published whole (model_index.json is uploaded last)."""
    from aspkd_ray import cache, storage

    if storage.is_uri(str(folder)):
        return cache.exists(str(folder), MARKER)
    folder = Path(folder)
    if not (folder / "model_index.json").is_file() or not (folder / "unet").is_dir():
        return False
    info = read_info(folder)
    return not info or bool(info.get("complete"))


class DDPMGenerator:
    """Sample a trained class-conditional DDPM; follows the generator protocol (plugin.py).

    Each sample's starting noise (and any per-step noise) comes from its own seeded
    `torch.Generator` on the CPU, so an image depends on its seed, not on its batch or device.
    """

    def __init__(self, folder: str | Path, scheduler: str = "ddim", steps: int = 25,
                 device: str | None = None, dtype: torch.dtype = torch.float32) -> None:
        from diffusers import UNet2DModel

        from aspkd_ray import cache
        from aspkd_ray.generation.text2image import dtype_kwarg

        if not is_ready(folder):
            raise FileNotFoundError(f"{folder} is not a trained generator (no model_index.json "
                                    f"and unet/); run `aspkd train-generator` first.")
        folder = cache.local_copy(folder, MARKER)  # a URI: this process's local mirror
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype
        self.unet = UNet2DModel.from_pretrained(folder, subfolder="unet", low_cpu_mem_usage=False,
                                                **dtype_kwarg(dtype)).to(self.device)
        self.unet.eval()
        train_cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        self.scheduler = sampling_scheduler(scheduler, train_cfg)
        self._step_takes_generator = step_takes_generator(self.scheduler)
        self.steps = steps
        self.info = read_info(folder)
        cfg = self.unet.config
        self.num_classes = int(cfg.num_class_embeds)
        self.shape = (int(cfg.in_channels), int(cfg.sample_size), int(cfg.sample_size))

    @torch.no_grad()
    def __call__(self, prompts: list[str], class_ids: list[int],
                 seeds: list[int]) -> list[np.ndarray]:
        n = len(class_ids)
        if not n:
            return []
        bad = [c for c in class_ids if not 0 <= int(c) < self.num_classes]
        if bad:
            raise ValueError(f"class ids {bad[:5]} out of range for a generator trained on "
                             f"{self.num_classes} classes.")
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        x = torch.stack([torch.randn(self.shape, generator=g) for g in gens])
        x = x.to(self.device, self.dtype) * self.scheduler.init_noise_sigma
        labels = torch.as_tensor([int(c) for c in class_ids], device=self.device)
        self.scheduler.set_timesteps(self.steps)
        for t in self.scheduler.timesteps:
            inp = self.scheduler.scale_model_input(x, t)
            out = self.unet(inp, t, class_labels=labels).sample
            x = self._step(out, t, x, gens)
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return list(x.permute(0, 2, 3, 1).cpu().numpy())

    def _step(self, out: torch.Tensor, t, x: torch.Tensor, gens: list) -> torch.Tensor:
        # Stochastic schedulers draw per-step noise: per-sample CPU generators keep each
        # image tied to its own seed.
        if self._step_takes_generator:
            return self.scheduler.step(out, t, x, generator=gens).prev_sample
        return self.scheduler.step(out, t, x).prev_sample


def step_takes_generator(scheduler: object) -> bool:
    """Whether `scheduler.step` accepts `generator=` (its per-step noise source).

    The four schedulers `sampling_scheduler` offers (DDIM, DDPM, DPM-Solver, Euler) take it
    (diffusers 0.42); some others do not (PNDM, UniPC), and are stepped without it. Checked
    once, from the signature, rather than by catching TypeError around step(): that would
    also swallow a real TypeError raised inside step() and silently re-run the step without
    the seeded noise.
    """
    try:
        params = inspect.signature(scheduler.step).parameters
    except (TypeError, ValueError):  # no introspectable signature: pass it, fail loudly
        return True
    return "generator" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
