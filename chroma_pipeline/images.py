"""Opening whatever users put in a dataset as the 8-bit RGB picture they see.

Phone photos carry their rotation in EXIF, print scans arrive as CMYK or 16-bit, logos
as palette or RGBA PNGs with transparency, memes as animated GIFs. Each becomes RGB
here, once, so the scan and the encoder agree on the pixels.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageColor, ImageOps

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def open_rgb(path: Path | bytes, background: str = "white") -> Image.Image:
    """Decode fully (a truncated file fails here), first frame only, EXIF rotation applied, RGB.

    Raises PIL's DecompressionBombError for images past Pillow's pixel limit, and OSError
    or ValueError for anything unreadable.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path) as image:
            image.seek(0)  # animations: the first frame
            image.load()
            return to_rgb(ImageOps.exif_transpose(image), background)


def to_rgb(image: Image.Image, background: str = "white") -> Image.Image:
    if image.mode in SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        image = _to_8bit_grey(image)
    if "transparency" in image.info:  # palette, RGB or grey PNGs with a transparent colour (tRNS)
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        # Transparent pixels take the background colour instead of whatever RGB they hide.
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, ImageColor.getrgb(background) + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")  # CMYK, YCbCr, L, 1, P without transparency


def _to_8bit_grey(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.float32)
    if image.mode == "F":
        peak = 1.0 if values.max(initial=0) <= 1.0 else 255.0
    else:  # "I" holds 16-bit data in practice (scanners, older Pillow's 16-bit PNGs)
        peak = 65535.0
    return Image.fromarray(np.clip(values / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
