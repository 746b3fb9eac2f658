"""`aspkd show-proxy`: a PNG grid of proxy samples, one row per class (the paper's Figure 2)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from aspkd_ray import storage

CELL = 64       # each image is shown at least this big (nearest-neighbour upscaling)
LABEL_W = 96    # room for the class name left of each row
PAD = 2


def show_proxy_grid(proxy_dir: str | Path, out_png: str | Path,
                    per_class: int = 8) -> Path | str:
    """Write `per_class` samples of every class (the first by sample id) as a PNG grid.
    `proxy_dir` and `out_png` are local paths or URIs; returns where the PNG went."""
    from PIL import Image, ImageDraw

    from aspkd_ray.generation.store import load_proxy_set

    if per_class < 1:
        raise ValueError(f"per_class: got {per_class}; expected a positive integer.")
    proxy = load_proxy_set(proxy_dir)
    names = proxy.class_names or tuple(str(c) for c in np.unique(proxy.classes))
    h, w = proxy.images.shape[1:3]
    scale = max(1, int(np.ceil(CELL / max(h, w))))
    ch, cw = h * scale, w * scale
    sheet = Image.new("RGB", (LABEL_W + per_class * (cw + PAD) + PAD,
                              len(names) * (ch + PAD) + PAD), "white")
    draw = ImageDraw.Draw(sheet)
    for row, name in enumerate(names):
        y = PAD + row * (ch + PAD)
        draw.text((4, y + ch // 2 - 5), str(name)[:14], fill="black")
        for col, i in enumerate(np.flatnonzero(proxy.classes == row)[:per_class]):
            img = proxy.images[i]
            tile = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
            tile = tile.convert("RGB").resize((cw, ch), Image.NEAREST)
            sheet.paste(tile, (LABEL_W + PAD + col * (cw + PAD), y))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    if storage.is_uri(str(out_png)):
        fs, path = storage.resolve(str(out_png))
        storage.write_bytes(fs, path, buf.getvalue())
        return str(out_png)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(buf.getvalue())
    return out
