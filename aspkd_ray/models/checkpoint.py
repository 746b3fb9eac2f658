"""Model checkpoints: a folder with `model.safetensors` and `model.json` (the architecture)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from aspkd_ray.models.zoo import ZooModel, create_model
from aspkd_ray.storage import atomic_file

WEIGHTS = "model.safetensors"
ARCH = "model.json"


def save_checkpoint(model: ZooModel, folder: str | Path, extra: dict | None = None) -> Path:
    """Write the weights and the architecture record; returns the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_file(folder / WEIGHTS) as tmp:  # a crash never leaves half a checkpoint
        save_file(state, tmp)
    (folder / ARCH).write_text(json.dumps({**model.arch, **(extra or {})}, indent=2))
    return folder


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a checkpoint folder, a .safetensors file or a torch file (weights only)."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} not found; train one (aspkd train-teacher) "
                                f"or point the config at an existing file.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return state


def load_weights(model: ZooModel, path: str | Path, strict: bool = True) -> ZooModel:
    """Initialise `model` from a checkpoint; a non-strict load skips a mismatched head."""
    state = read_state_dict(path)
    if not strict:
        own = model.state_dict()
        state = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(state, strict=strict)
    return model


def load_checkpoint(folder: str | Path) -> ZooModel:
    """Rebuild the model recorded in `folder/model.json` and load its weights."""
    folder = Path(folder)
    arch_file = folder / ARCH
    if not arch_file.is_file():
        raise FileNotFoundError(f"{arch_file} not found: {folder} is not a checkpoint folder "
                                f"written by aspkd (model.json + model.safetensors).")
    arch = json.loads(arch_file.read_text())
    model = create_model(arch["name"], num_classes=arch["num_classes"],
                         in_chans=arch["in_chans"], image_size=arch["image_size"])
    return load_weights(model, folder)
