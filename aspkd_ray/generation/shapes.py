"""A cheap generator plugin for scale tests: class-coloured shapes on a noisy background.

It stands in for a real text-to-image model when what is being tested is the machinery (a
100k-image proxy set, sharding, Ray scheduling, pool building, latents at scale), not the
quality of the images: a 224 x 224 image costs about a millisecond on one core (PNG encoding
included), so a large pool can be built on a laptop in minutes. Class c always draws the
same kind of shape in the same hue; position, size, rotation, brightness and the background
tint come from the image's seed, so the classes are separable but not identical images. The
noise is drawn on a coarse grid and upsampled (blocks), which keeps the PNGs small (a few KB
at 224 x 224) where per-pixel noise would make them as large as the raw pixels.

Use it in a config (images are generated at `generator.resolution` and stored at the victim's
input size, so make the two equal to skip the resize):

    dataset:
      image_size: 224
      channels: 3
    generator:
      kind: plugin
      plugin: "aspkd_ray.generation.shapes:shapes"
      resolution: 224

The same seeds give the same bytes (numpy's PCG64 seeded with each image's seed, and PIL's
drawing, which is integer and deterministic); prompts are ignored.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from aspkd_ray.config.schema import GeneratorConfig

# Shape kinds in the order classes use them (class c draws KINDS[c % len(KINDS)]).
KINDS = ("disc", "triangle", "square", "pentagon", "hexagon", "star", "ring", "cross")
NOISE_CELLS = 28     # noise grid per side: 8-pixel blocks at 224 x 224
NOISE_AMPLITUDE = 14  # grey levels either side; the background tint stays recognisable
_SEED_MASK = (1 << 64) - 1  # numpy wants a non-negative seed; the plan's are 63-bit anyway

ShapesGenerator = Callable[[list[str], list[int], list[int]], list[np.ndarray]]


def class_style(class_id: int, num_classes: int) -> tuple[str, float]:
    """(shape kind, hue in [0, 1)) of a class: kind c % len(KINDS); the classes of one kind
    get hues 1 / rows apart (rows = ceil(num_classes / len(KINDS)), cyclically), and each kind
    its own offset within that step, so no two classes look alike."""
    if not 0 <= class_id < num_classes:
        raise ValueError(f"class id {class_id} is outside 0..{num_classes - 1}.")
    per_row = min(len(KINDS), num_classes)  # few classes: hues spread over the whole circle
    rows = -(-num_classes // per_row)
    row, kind = divmod(class_id, per_row)
    return KINDS[kind], (row + kind / per_row) / rows


def _rgb(hue: float, saturation: float, value: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(hue, saturation, value)
    return round(255 * r), round(255 * g), round(255 * b)


def _polygon(cx: float, cy: float, radii: Sequence[float], rotation: float) -> list[tuple]:
    """Vertices of a polygon with the given radii at even angles (a star alternates two)."""
    n = len(radii)
    return [(cx + r * math.cos(rotation + 2 * math.pi * k / n),
             cy + r * math.sin(rotation + 2 * math.pi * k / n)) for k, r in enumerate(radii)]


def _cross(cx: float, cy: float, radius: float, rotation: float) -> list[tuple]:
    """A plus sign of arm half-width radius/3, rotated about its centre."""
    a, w = radius, radius / 3
    corners = [(w, a), (w, w), (a, w), (a, -w), (w, -w), (w, -a),
               (-w, -a), (-w, -w), (-a, -w), (-a, w), (-w, w), (-w, a)]
    c, s = math.cos(rotation), math.sin(rotation)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in corners]


def draw_image(resolution: int, class_id: int, num_classes: int, seed: int) -> np.ndarray:
    """One uint8 resolution x resolution x 3 image of class `class_id`, fixed by `seed`."""
    from PIL import Image, ImageDraw

    kind, hue = class_style(class_id, num_classes)
    rng = np.random.default_rng(seed & _SEED_MASK)
    # One draw of every random number, in a fixed order, whatever the kind: the geometry of
    # a seed does not depend on its class.
    bg_hue, bg_sat, bg_val, sat, val, size, fx, fy, rotation = rng.random(9)
    # Background: pale, unsaturated (saturation <= 0.3); shape: saturated (>= 0.65), so the
    # class hue dominates the colour statistics.
    background = _rgb(bg_hue, 0.3 * bg_sat, 0.3 + 0.6 * bg_val)
    colour = _rgb(hue, 0.65 + 0.35 * sat, 0.75 + 0.25 * val)
    radius = resolution * (0.18 + 0.2 * size)
    cx = radius + fx * (resolution - 2 * radius)  # the shape stays (nearly) inside the frame
    cy = radius + fy * (resolution - 2 * radius)
    rotation *= 2 * math.pi

    img = Image.new("RGB", (resolution, resolution), background)
    draw = ImageDraw.Draw(img)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if kind == "disc":
        draw.ellipse(box, fill=colour)
    elif kind == "ring":
        draw.ellipse(box, outline=colour, width=max(1, round(radius / 3)))
    elif kind == "cross":
        draw.polygon(_cross(cx, cy, radius, rotation), fill=colour)
    elif kind == "star":
        draw.polygon(_polygon(cx, cy, [radius, radius * 0.45] * 5, rotation), fill=colour)
    else:
        sides = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6}[kind]
        draw.polygon(_polygon(cx, cy, [radius] * sides, rotation), fill=colour)

    # Grey noise on a coarse grid, upsampled nearest: blocks of equal pixels compress to
    # almost nothing in PNG (its row filters turn them into runs of zeros).
    cells = min(NOISE_CELLS, resolution)
    block = -(-resolution // cells)  # ceil: the grid covers the image, cropped below
    noise = rng.integers(-NOISE_AMPLITUDE, NOISE_AMPLITUDE + 1, (cells, cells, 1),
                         dtype=np.int16)
    noise = noise.repeat(block, axis=0).repeat(block, axis=1)[:resolution, :resolution]
    out = np.asarray(img, dtype=np.int16) + noise
    return np.clip(out, 0, 255, out=out).astype(np.uint8)


def shapes(config: GeneratorConfig, class_names: Sequence[str],
           device: str | None = None) -> ShapesGenerator:
    """Plugin factory (see aspkd_ray.generation.plugin): a generator of
    config.resolution x config.resolution RGB shape images. `device` is ignored (CPU only)."""
    resolution, num_classes = int(config.resolution), len(class_names)
    if num_classes < 1:
        raise ValueError("the shapes generator needs at least one class name.")

    def generate(prompts: list[str], class_ids: list[int],
                 seeds: list[int]) -> list[np.ndarray]:
        if len(class_ids) != len(seeds):
            raise ValueError(f"got {len(class_ids)} class ids and {len(seeds)} seeds; "
                             f"expected one of each per image.")
        return [draw_image(resolution, int(c), num_classes, int(s))
                for c, s in zip(class_ids, seeds, strict=True)]

    return generate
