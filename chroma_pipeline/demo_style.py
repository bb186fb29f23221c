"""The demo's style: "ember", a two-colour palette the base model has never seen.

Each styled picture keeps its shapes but is recoloured by brightness onto the line from a
deep violet to an orange (a duotone). Only captions that say "in ember style" carry it, so
an adapter has to read the caption to know when to apply it: one that learns the palette
while ignoring the text (a broken text mask, say) shows it where it should not.

`ember_distance` measures the style in any picture: the mean RGB distance of its pixels from
that violet-orange line, 0 for a perfect duotone, about 80-100 for the base model's saturated
reds, blues and greens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

TRIGGER = "in ember style"
EMBER_DARK = np.array([70.0, 20.0, 110.0])
EMBER_LIGHT = np.array([255.0, 160.0, 40.0])


def ember(image: Image.Image) -> Image.Image:
    """The picture recoloured by luminance onto the violet-orange line."""
    luminance = np.asarray(image.convert("L"), dtype=np.float64)[..., None] / 255.0
    pixels = (1 - luminance) * EMBER_DARK + luminance * EMBER_LIGHT
    return Image.fromarray(pixels.round().astype(np.uint8), "RGB")


def ember_distance(image: Image.Image) -> float:
    """Mean distance (RGB units, 0-255 scale) of the pixels from the ember duotone line."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3)
    direction = EMBER_LIGHT - EMBER_DARK
    along = np.clip((pixels - EMBER_DARK) @ direction / (direction @ direction), 0.0, 1.0)
    nearest = EMBER_DARK + along[:, None] * direction
    return float(np.linalg.norm(pixels - nearest, axis=1).mean())


def stylise_dataset(folder: Path, plain_every: int = 3) -> tuple[int, int]:
    """Recolour the pictures of a caption folder in place, leaving every `plain_every`-th plain.

    Styled pictures get ", in ember style" after their caption. Returns (styled, plain) counts.
    """
    styled = plain = 0
    for index, path in enumerate(sorted(Path(folder).glob("*.png"))):
        if index % plain_every == plain_every - 1:
            plain += 1
            continue
        with Image.open(path) as picture:
            ember(picture).save(path)
        caption = path.with_suffix(".txt")
        caption.write_text(f"{caption.read_text().strip()}, {TRIGGER}\n")
        styled += 1
    return styled, plain
