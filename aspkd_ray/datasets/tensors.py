"""uint8 image arrays → float tensors at the model's input size, and batch augmentation."""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F


def to_tensor(images: np.ndarray, size: int, channels: int) -> torch.Tensor:
    """uint8 N x H x W x C → float N x channels x size x size in [0, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
    if x.ndim == 3:
        x = x.unsqueeze(-1)
    x = x.permute(0, 3, 1, 2)
    if x.shape[1] != channels:
        x = x.mean(1, keepdim=True) if channels == 1 else x.expand(-1, channels, -1, -1)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False)
    return x.clamp_(0.0, 1.0).contiguous()


def augment(x: torch.Tensor, generator: torch.Generator, flip: bool, pad: int = 2) -> torch.Tensor:
    """Random translation by up to `pad` pixels, and horizontal flips when `flip` is set."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])  # n x h
    cols = (dx[:, None] + torch.arange(w)[None, :])  # n x w
    out = padded[torch.arange(n)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None],
                 rows[:, None, :, None], cols[:, None, None, :]]
    if flip:
        mask = torch.rand(n, generator=generator) < 0.5
        out[mask] = out[mask].flip(-1)
    return out


def png_encode(image: np.ndarray) -> bytes:
    """uint8 H x W x C (C = 1 or 3) → PNG bytes."""
    from PIL import Image

    arr = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def png_decode(data: bytes) -> np.ndarray:
    """PNG bytes → uint8 H x W x C."""
    from PIL import Image

    arr = np.asarray(Image.open(io.BytesIO(data)))
    return arr[..., None] if arr.ndim == 2 else arr
