"""Measuring what the `toy` model draws: reconstruction PSNR, and which palette colours a picture shows.

Colours are named by the nearest entry of demo_data's palette, the one the pictures are drawn
from, so "is the circle red?" is a lookup, not a judgement. The background is what most of the
border shows; the foreground is the commonest colour inside that is not the background.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .demo_data import COLOURS

_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[name] for name in _NAMES], dtype=np.float32)
# Fewer foreground pixels than this share of the picture means nothing was drawn on the background.
MIN_FOREGROUND_SHARE = 0.03


def psnr(reference: Image.Image, reconstruction: Image.Image) -> float:
    """Peak signal-to-noise ratio in dB over 8-bit RGB."""
    a = np.asarray(reference.convert("RGB"), dtype=np.float64)
    b = np.asarray(reconstruction.convert("RGB"), dtype=np.float64)
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def palette_names(image: Image.Image) -> np.ndarray:
    """(H, W) array of the nearest palette colour's index for every pixel."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    distances = ((pixels[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1)
    return distances.argmin(-1)


def picture_colours(image: Image.Image) -> tuple[str | None, str]:
    """(foreground, background) palette names; foreground is None when the picture is all background."""
    names = palette_names(image)
    border = np.concatenate([names[0], names[-1], names[1:-1, 0], names[1:-1, -1]])
    background = int(np.bincount(border, minlength=len(_NAMES)).argmax())
    rest = names[names != background]
    if rest.size < MIN_FOREGROUND_SHARE * names.size:
        return None, _NAMES[background]
    return _NAMES[int(np.bincount(rest, minlength=len(_NAMES)).argmax())], _NAMES[background]


def colours_match(image: Image.Image, foreground: str, background: str) -> dict[str, bool]:
    """Whether the picture's foreground and background are the named palette colours."""
    seen_foreground, seen_background = picture_colours(image)
    return {"foreground": seen_foreground == foreground, "background": seen_background == background}
