"""Aspect buckets: every image is resized to cover its bucket, then centre-cropped.

Bucket sides are multiples of 64: the VAE downsamples by 8 and the transformer packs
2x2 latent patches, and 64 keeps every Chroma resolution on the same grid.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image

BUCKET_STEP = 64
MEGAPIXEL = 1024 * 1024  # resolution_type "area": 1.0 means a 1024x1024 budget
MAX_ASPECT = 4.0
# An image blown up more than this to cover its bucket is skipped as too small (`maximum_upscale`).
# SimpleTuner (`max_upscale_threshold`) and kohya (`bucket_no_upscale`) upscale without limit by
# default, yet both guides warn against images much smaller than the resolution. 2x keeps an image
# of half the training size (a 512 px photo at 1024) and drops thumbnails, icons and 1x1 pixels.
DEFAULT_MAXIMUM_UPSCALE = 2.0


def _snap(value: float) -> int:
    return max(BUCKET_STEP, int(round(value / BUCKET_STEP)) * BUCKET_STEP)


def bucket_for(
    width: int, height: int, resolution: float, resolution_type: str, crop_aspect: str = "preserve"
) -> tuple[int, int]:
    """The (width, height) bucket of an image.

    - pixel: the shorter edge becomes `resolution`, the longer keeps the aspect ratio.
    - pixel_area: the pixel count of a `resolution` x `resolution` square, at the image's aspect ratio.
    - area: `resolution` megapixels, at the image's aspect ratio.
    `crop_aspect="square"` puts every image in the square bucket of that size instead.
    """
    if width < height:  # a portrait gets its landscape twin's bucket, turned: 2:3 is 3:2 on its side
        turned = bucket_for(height, width, resolution, resolution_type, crop_aspect)
        return turned[1], turned[0]
    # Long side over short side, rounded so near-equal ratios share a bucket; clamped so a 1:50 strip
    # still gets a sane bucket (cropped to 1:4).
    aspect = 1.0 if crop_aspect == "square" else min(MAX_ASPECT, round(width / height, 2))
    if resolution_type == "pixel":
        short = int(resolution)
        return _snap(short * aspect), short
    area = resolution * resolution if resolution_type == "pixel_area" else resolution * MEGAPIXEL
    return _snap(math.sqrt(area * aspect)), _snap(math.sqrt(area / aspect))


def upscale_needed(width: int, height: int, bucket: tuple[int, int]) -> float:
    return max(bucket[0] / width, bucket[1] / height)


def fit_to_bucket(
    image: Image.Image, bucket: tuple[int, int], crop: bool = True, crop_style: str = "center", seed: str = ""
) -> Image.Image:
    """Scale so the image covers the bucket, then crop the overflow; or, with `crop=False`, stretch to it.

    `crop_style`: "center" crops equally from both sides, "corner" keeps the top-left, "random"
    picks an offset from `seed` (the image hash), so the crop is random but the same every run
    and the cached latent stays valid.
    """
    target_w, target_h = bucket
    if not crop:
        return image.resize(bucket, Image.Resampling.LANCZOS)
    scale = upscale_needed(image.width, image.height, bucket)
    resized = image.resize(
        (max(target_w, round(image.width * scale)), max(target_h, round(image.height * scale))),
        Image.Resampling.LANCZOS,
    )
    spare_w, spare_h = resized.width - target_w, resized.height - target_h
    if crop_style == "corner":
        left, top = 0, 0
    elif crop_style == "random":
        rng = random.Random(seed)
        left, top = rng.randint(0, spare_w), rng.randint(0, spare_h)
    else:
        left, top = spare_w // 2, spare_h // 2
    return resized.crop((left, top, left + target_w, top + target_h))


def to_model_input(image: Image.Image) -> torch.Tensor:
    """HWC uint8 -> CHW float in [-1, 1], what the VAE expects."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
