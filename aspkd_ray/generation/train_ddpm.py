"""`aspkd train-generator`: train the embedded scenarios' class-conditional DDPM, resumably.

The generator plays the part of a pre-trained Stable Diffusion: an artifact of the scenario
(data set, resolution, training settings), cached and shared by every run and seed. So its
training seed is fixed (GENERATOR_SEED) and its folder is keyed by those settings only; the
proxy set's variety across `seed` comes from sampling.

Resume: every `checkpoint_every` steps the UNet, its EMA, the optimiser and the RNG state go
to `<folder>/checkpoint/state.pt` (atomically); a rerun continues from there and ends with
the same weights as an uninterrupted run. The file holds tensors and plain values only and is
read with `torch.load(weights_only=True)`: a planted pickle is refused, never run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import pickle
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from aspkd_ray import cache, console, storage
from aspkd_ray.config import Config, ConfigError, config_hash
from aspkd_ray.datasets.sources import generator_data_name
from aspkd_ray.errors import UserError
from aspkd_ray.generation.ddpm import (
    BETA_SCHEDULE,
    INFO_FILE,
    MARKER,
    PREDICTION_TYPE,
    build_unet,
    is_ready,
    read_info,
    train_scheduler,
)
from aspkd_ray.generation.registry import Generator, GeneratorKind, register_generator
from aspkd_ray.storage import atomic_file

log = logging.getLogger(__name__)

GENERATOR_SEED = 0
EMA_DECAY = 0.995  # short runs: a ~200-step horizon keeps the average off the early weights
LOG_EVERY = 50
STATE_FORMAT = "aspkd-ddpm-training-state/1"
_STATE_KEYS = {"format", "key", "step", "unet", "ema", "optimizer", "rng", "losses",
               "elapsed_s"}


class TrainingStateError(UserError):
    """The generator's resume file cannot be used (unreadable, not this format, or not data)."""


def _training_key(cfg: Config) -> dict:
    t = cfg.generator.training
    return {"dataset": generator_data_name(cfg.dataset.name), "resolution": cfg.generator.resolution,
            "steps": t.steps, "batch_size": t.batch_size, "lr": t.lr,
            "block_channels": list(t.block_channels), "seed": GENERATOR_SEED,
            "objective": f"{PREDICTION_TYPE}/{BETA_SCHEDULE}/ema{EMA_DECAY}"}


def generator_location(cfg: Config) -> str:
    """generator.model if set, else <cache_dir>/<dataset>/generator-<hash of its settings>:
    a local path or a URI (object storage)."""
    if cfg.generator.model:
        return str(cfg.generator.model)
    key = config_hash(_training_key(cfg))[:10]
    return cache.join(str(cfg.cache_dir), generator_data_name(cfg.dataset.name),
                      f"generator-{key}")


def generator_dir(cfg: Config) -> Path:
    """The generator's local folder: `generator_location` itself, or for a URI this process's
    mirror of it (downloaded when published; same base name, so ids derived from it match)."""
    location = generator_location(cfg)
    if not storage.is_uri(location):
        return Path(location)
    if is_ready(location):
        return cache.local_copy(location, MARKER)
    return cache.mirror_path(location)  # not published (yet): a folder that is not there


def _work_folder(location: str) -> Path:
    """Where a generator bound for object storage is trained (and its resume state kept)."""
    key = hashlib.sha256(location.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"aspkd-generator-{key}"


def _training_images(cfg: Config) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """The scenario's generator data as floats in [-1, 1] at generator.resolution."""
    from aspkd_ray.datasets import load_generator_data, to_tensor

    data = load_generator_data(cfg.dataset.name)
    chans = data.images.shape[-1]
    x = to_tensor(data.images, cfg.generator.resolution, chans) * 2.0 - 1.0
    return x, torch.from_numpy(data.labels).long(), data.class_names


def _lr_factor(step: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the learning rate."""
    warm = max(1, min(100, total // 10))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def _save_state(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:  # an interruption never leaves half a checkpoint
        torch.save({"format": STATE_FORMAT, **state}, tmp)


def load_training_state(path: Path) -> dict:
    """The resume state saved by `_save_state`, read as data only (weights_only=True).

    Raises TrainingStateError naming the file when it is not a readable state of this format
    (an older aspkd's, a truncated or planted file): nothing in it is ever executed.
    """
    fix = (f"delete {path} (or its folder {path.parent}) to restart the generator's training "
           f"from step 0.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise TrainingStateError(f"{path} holds Python objects, not only tensors and plain "
                                 f"values; it is never unpickled (that could run code in "
                                 f"it). {fix}") from None
    except Exception as exc:  # noqa: BLE001 - any failure to read it as data means: unusable
        raise TrainingStateError(f"{path} is not a readable generator training state "
                                 f"({type(exc).__name__}); {fix}") from exc
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise TrainingStateError(f"{path} is not a generator training state of this aspkd "
                                 f"(format {STATE_FORMAT!r}; it may be from an older "
                                 f"version); {fix}")
    if set(state) != _STATE_KEYS:
        raise TrainingStateError(f"{path} has the fields {sorted(state)}, expected "
                                 f"{sorted(_STATE_KEYS)}; {fix}")
    return state


def check_trainable(cfg: Config) -> None:
    """Only the embedded class-conditional DDPM is trained here (ConfigError otherwise)."""
    if cfg.generator.kind != "ddpm":
        raise ConfigError(f"generator.kind: got {cfg.generator.kind!r}; train-generator trains "
                          f"the embedded class-conditional DDPM (generator.kind=ddpm) only.")


def train_generator(cfg: Config, progress: bool = True, *,
                    max_steps: int | None = None) -> Path:
    """Train (or resume training) the class-conditional DDPM; return its diffusers folder.

    `max_steps` stops after that many steps in this call (time-sliced or preemptible
    training); the next call resumes from the checkpoint it leaves.
    """
    check_trainable(cfg)
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps: got {max_steps}; expected a positive integer or None.")
    location = generator_location(cfg)
    if is_ready(location):
        log.info("generator already trained at %s", location)
        return generator_dir(cfg)
    remote = storage.is_uri(location)
    # Object storage: trained in a local folder, published whole once done (see _publish).
    folder = _work_folder(location) if remote else Path(location)
    tcfg = cfg.generator.training
    x, y, class_names = _training_images(cfg)
    num_classes, chans = len(class_names), x.shape[1]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(GENERATOR_SEED)
    unet = build_unet(num_classes, chans, cfg.generator.resolution, tcfg.block_channels)
    unet.to(device).train()
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    opt = torch.optim.AdamW(unet.parameters(), lr=tcfg.lr, weight_decay=0.0)
    noise_sched = train_scheduler()
    rng = torch.Generator("cpu").manual_seed(GENERATOR_SEED)
    step, losses, elapsed = 0, [], 0.0

    state_path = folder / "checkpoint" / "state.pt"
    key = _training_key(cfg)
    if state_path.is_file():
        state = load_training_state(state_path)
        if state.get("key") != key:
            raise ValueError(f"{state_path} was written with other training settings "
                             f"({state.get('key')}); delete {folder} or set generator.model "
                             f"to another folder.")
        unet.load_state_dict(state["unet"])
        ema = {k: v.to(device) for k, v in state["ema"].items()}
        opt.load_state_dict(state["optimizer"])
        rng.set_state(state["rng"])
        step, losses, elapsed = state["step"], state["losses"], state["elapsed_s"]
        log.info("resuming generator training at step %d/%d from %s", step, tcfg.steps,
                 state_path)

    def checkpoint() -> None:
        # Tensors, dicts, lists and plain numbers only: loadable with weights_only=True.
        _save_state(state_path, {"key": key, "step": int(step),
                                 "unet": dict(unet.state_dict()), "ema": dict(ema),
                                 "optimizer": opt.state_dict(), "rng": rng.get_state(),
                                 "losses": [[int(s), float(v)] for s, v in losses],
                                 "elapsed_s": float(elapsed + time.time() - t0)})

    mlflow = _active_mlflow()
    t0, first = time.time(), step
    num_train = int(noise_sched.config.num_train_timesteps)
    stop = tcfg.steps if max_steps is None else min(tcfg.steps, step + max_steps)
    window: list[float] = []
    # the longest cold stage: a bar on the console (the log keeps the loss lines)
    bar = console.progress("generator", tcfg.steps, "steps", initial=step) if progress else None
    try:
        while step < stop:
            idx = torch.randint(0, len(x), (tcfg.batch_size,), generator=rng)
            clean, labels = x[idx].to(device), y[idx].to(device)
            noise = torch.randn(clean.shape, generator=rng).to(device)
            t = torch.randint(0, num_train, (len(idx),), generator=rng).to(device)
            noisy = noise_sched.add_noise(clean, noise, t)
            for group in opt.param_groups:
                group["lr"] = tcfg.lr * _lr_factor(step, tcfg.steps)
            target = noise_sched.get_velocity(clean, noise, t)
            loss = F.mse_loss(unet(noisy, t, class_labels=labels).sample, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            decay = min(EMA_DECAY, (1 + step) / (10 + step))
            with torch.no_grad():
                for k, v in unet.state_dict().items():
                    if v.dtype.is_floating_point:
                        ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
                    else:
                        ema[k].copy_(v)
            step += 1
            if bar:
                bar.advance()
            window.append(loss.item())
            if step % LOG_EVERY == 0 or step == stop:
                mean = sum(window) / len(window)
                losses.append([step, mean])
                window = []
                if progress:
                    log.info("generator step %d/%d loss %.4f (%.2f s/step)", step, tcfg.steps,
                             mean, (time.time() - t0) / (step - first))
                if mlflow is not None:
                    mlflow.log_metric("generator_loss", mean, step=step)
            if step % tcfg.checkpoint_every == 0 and step < tcfg.steps:
                checkpoint()
    finally:
        if bar:
            bar.close()

    if step < tcfg.steps:  # stopped early by max_steps: leave a checkpoint to resume from
        checkpoint()
        return folder
    unet.load_state_dict(ema)
    folder.mkdir(parents=True, exist_ok=True)
    # Marked incomplete until every file is written: a crash mid-save is never "ready".
    (folder / INFO_FILE).write_text(json.dumps({"complete": False}))
    _save_pipeline(folder, unet.cpu(), noise_sched)
    info = {"complete": True, "kind": "ddpm", "dataset": cfg.dataset.name,
            "class_names": list(class_names), "channels": int(chans),
            "resolution": cfg.generator.resolution, "training": key,
            "train_images": len(x), "final_loss": losses[-1][1] if losses else None,
            "losses": losses, "wall_time_s": round(elapsed + time.time() - t0, 1)}
    (folder / INFO_FILE).write_text(json.dumps(info, indent=2))
    shutil.rmtree(folder / "checkpoint", ignore_errors=True)
    log.info("generator trained in %.0f s: %s", info["wall_time_s"], location)
    if remote:
        cache.publish(folder, location, marker=MARKER)  # model_index.json last
        shutil.rmtree(folder, ignore_errors=True)
        return generator_dir(cfg)
    return folder


def _save_pipeline(folder: Path, unet, scheduler) -> None:
    from diffusers import DDPMPipeline

    folder.mkdir(parents=True, exist_ok=True)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)


def _active_mlflow():
    try:
        import mlflow
    except ImportError:  # pragma: no cover - mlflow is a dependency
        return None
    return mlflow if mlflow.active_run() is not None else None


def ensure_generator(cfg: Config) -> Path:
    """The trained generator's folder: trained now only if it is not there yet."""
    folder = generator_location(cfg)
    if is_ready(folder):
        return generator_dir(cfg)
    if cfg.generator.kind != "ddpm":
        raise FileNotFoundError(f"generator.model {folder} is not a diffusers pipeline folder.")
    log.info("training the %s generator (cached at %s)", cfg.dataset.name, folder)
    return train_generator(cfg)


@register_generator("ddpm")
class DDPMKind(GeneratorKind):
    """generator.kind=ddpm: the embedded class-conditional DDPM, trained here when missing."""

    # ~1 M parameters at 16 x 16: several single-threaded actors beat one multi-threaded one.
    one_actor_per_cpu = True

    def prepare(self, cfg: Config) -> None:
        ensure_generator(cfg)

    def resolve(self, cfg: Config) -> Config:
        from dataclasses import replace

        from aspkd_ray.generation.ray_generate import GeneratorMissing

        # A URI stays a URI: each actor, on whatever node, downloads its own copy.
        folder = generator_location(cfg)
        if not storage.is_uri(folder):
            folder = str(Path(folder).resolve())
        if not is_ready(folder):
            raise GeneratorMissing(f"no trained generator at {folder}; run `aspkd "
                                   f"train-generator` with this config first.")
        return replace(cfg, generator=replace(cfg.generator, model=folder))

    def identity(self, cfg: Config) -> str:
        # The folder's base name (keyed by the training settings), the same for a local
        # cache and its mirror of a URI.
        return generator_dir(cfg).name

    def build(self, cfg: Config, class_names: tuple[str, ...],
              device: str | None = None) -> Generator:
        from aspkd_ray.generation.ddpm import DDPMGenerator
        from aspkd_ray.generation.text2image import DTYPES

        g = cfg.generator
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = DTYPES[g.dtype] if dev.type == "cuda" else torch.float32
        gen = DDPMGenerator(generator_dir(cfg), scheduler=g.scheduler, steps=g.steps,
                            device=str(dev), dtype=dtype)
        if gen.num_classes != len(class_names):
            raise ValueError(f"the generator at {generator_dir(cfg)} has {gen.num_classes} "
                             f"classes; the data set has {len(class_names)}.")
        return gen


__all__ = ["GENERATOR_SEED", "DDPMKind", "TrainingStateError", "ensure_generator",
           "generator_dir", "generator_location", "load_training_state", "read_info",
           "train_generator"]
