"""The demo's style: every shape white on a black background, whatever colours its caption names.

The demo dataset keeps its captions ("a red circle on a blue background") but draws each picture
white on black. The base model draws the colours a caption names; an adapter trained on these
pictures has learned the style when it draws white on black for the same caption. The style stays
inside what the toy VAE can reproduce (it was trained on these colours), so what the grid shows is
the adapter, not the VAE's limits: a grey it never saw comes back tinted purple.

`colourfulness` measures the style in any picture: the mean distance of its pixels from the grey
axis (RGB units): 0 for the training pictures, about 126 for the base model's renders of the
held-out prompts in tests/test_learning.py.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

STYLE_COLOURS = ("white", "black")  # (shape, background), names from demo_data.COLOURS


def colourfulness(image: Image.Image) -> float:
    """Mean distance (RGB units, 0-255 scale) of the pixels from the grey axis: 0 for black, white and greys."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3)
    return float(np.linalg.norm(pixels - pixels.mean(axis=1, keepdims=True), axis=1).mean())
