"""A generated demo dataset: coloured shapes in three aspect ratios, one `.txt` caption each.

Nothing binary is committed; the same seed draws the same images. `draw_picture` draws one
captioned picture of the same kind (also on gradient backgrounds): the `toy` flavour is trained on it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .demo_style import STYLE_COLOURS
from .toy import TOY_GUIDANCE, TOY_RESOLUTION

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "purple": (140, 60, 190), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "stripes")
SIZES = {"square": (256, 256), "landscape": (384, 256), "portrait": (256, 384)}


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, size: tuple[int, int], colour, rng: random.Random,
                scale: int = 1) -> None:
    """The shape placed on a `size` picture, drawn `scale` times larger (to be scaled down, antialiased)."""
    w, h = size
    r = min(w, h) * rng.uniform(0.22, 0.34)
    cx, cy = w * rng.uniform(0.35, 0.65), h * rng.uniform(0.35, 0.65)
    r, cx, cy = r * scale, cx * scale, cy * scale
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    else:
        stripe = max(8, int(r / scale / 3)) * scale
        for x in range(0, w * scale, 2 * stripe):
            draw.rectangle((x, 0, x + stripe - 1, h * scale), fill=colour)


def _gradient(size: tuple[int, int], start, end, direction: str) -> Image.Image:
    w, h = size
    along = {"horizontal": np.linspace(0, 1, w)[None, :], "vertical": np.linspace(0, 1, h)[:, None],
             "diagonal": (np.linspace(0, 1, w)[None, :] + np.linspace(0, 1, h)[:, None]) / 2}[direction]
    along = np.broadcast_to(along, (h, w))[..., None]
    pixels = (1 - along) * np.array(start, float) + along * np.array(end, float)
    return Image.fromarray(pixels.round().astype(np.uint8), "RGB")


def draw_picture(rng: random.Random, size, foreground: str | None = None, shape: str | None = None,
                 background: str | None = None, gradient: float = 0.25) -> tuple[Image.Image, str]:
    """One shape on a plain (or, with probability `gradient`, a two-colour gradient) background, and its caption.

    `size` is a side or (width, height); what is not given is drawn from `rng`, e.g.
    "a red circle on a blue background", "green stripes on a black to white gradient background".
    """
    size = (size, size) if isinstance(size, int) else tuple(size)
    names = list(COLOURS)
    foreground = foreground or rng.choice(names)
    background = background or rng.choice([c for c in names if c != foreground])
    shape = shape or rng.choice(SHAPES)
    if rng.random() < gradient:
        end = rng.choice([c for c in names if c not in (foreground, background)])
        image = _gradient(size, COLOURS[background], COLOURS[end], rng.choice(["horizontal", "vertical", "diagonal"]))
        where = f"on a {background} to {end} gradient background"
    else:
        image = Image.new("RGB", size, COLOURS[background])
        where = f"on a {background} background"
    # Drawn 4x larger and scaled down: antialiased edges, as in pictures that were not drawn pixel by pixel.
    mask = Image.new("L", (size[0] * 4, size[1] * 4), 0)
    _draw_shape(ImageDraw.Draw(mask), shape, size, 255, rng, scale=4)
    image.paste(COLOURS[foreground], mask=mask.resize(size, Image.BOX))
    subject = f"{foreground} stripes" if shape == "stripes" else f"a {foreground} {shape}"
    return image, f"{subject} {where}"


def make_demo_dataset(folder: Path, count: int = 36, seed: int = 0, drawn_in: tuple[str, str] | None = None) -> list[Path]:
    """Write `count` images with distinct captions into `folder`; returns the image paths.

    With `drawn_in` = (shape colour, background colour), every picture is drawn in those two
    colours while its caption still names the ones it was given: a style to learn.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    combos = [
        (fg, shape, bg, layout)
        for shape in SHAPES
        for fg in COLOURS
        for bg in COLOURS
        for layout in SIZES
        if fg != bg
    ]
    rng.shuffle(combos)
    # Round-robin over the layouts so every aspect ratio is well represented.
    chosen, captioned = [], set()  # one picture per (colour, shape, background): distinct captions
    layouts = list(SIZES)
    for i in range(count):
        layout = layouts[i % len(layouts)]
        combo = next(c for c in combos if c[3] == layout and c[:3] not in captioned)
        chosen.append(combo)
        captioned.add(combo[:3])

    paths = []
    for index, (fg, shape, bg, layout) in enumerate(chosen):
        size = SIZES[layout]
        shape_colour, background_colour = drawn_in or (fg, bg)
        image = Image.new("RGB", size, COLOURS[background_colour])
        _draw_shape(ImageDraw.Draw(image), shape, size, COLOURS[shape_colour], rng)
        stem = f"{index:03d}-{fg}-{shape}-{layout}"
        path = folder / f"{stem}.png"
        image.save(path)
        subject = f"{fg} stripes" if shape == "stripes" else f"a {fg} {shape}"
        (folder / f"{stem}.txt").write_text(f"{subject} on a {bg} background\n")
        paths.append(path)
    return paths


def demo_config(dataset_dir: Path, output_dir: Path) -> dict:
    """A tiny-flavour config that runs the whole chain on 2 CPU cores in a few minutes: what tests build on."""
    return {
        "model_type": "lora",
        "model_family": "chroma",
        "model_flavour": "tiny",
        "instance_data_dir": str(dataset_dir),
        "output_dir": str(output_dir),
        "resolution": 256,
        "resolution_type": "pixel_area",
        "base_model_precision": "int8-quanto",
        "network_rank": 8,
        "learning_rate": 1e-3,
        "lr_scheduler": "constant",
        "train_batch_size": 2,
        "max_train_steps": 120,
        "mixed_precision": "bf16",
        "gradient_checkpointing": False,
        "tokenizer_max_length": 64,
        "validation_prompt": ["red circle on a blue background", "yellow stripes on a black background"],
        "validation_seed": [1, 2],
        "validation_guidance_real": 1.0,
        "validation_num_inference_steps": 20,
        "validation_steps": 40,  # a progress strip at steps 40, 80 and 120
        "seed": 42,
    }


def style_demo_config(dataset_dir: Path, output_dir: Path) -> dict:
    """What `chroma-demo` trains: the `toy` Chroma (it draws) learning to draw white on black, at its 64 px."""
    return {
        **demo_config(dataset_dir, output_dir),
        "model_flavour": "toy",
        "resolution": TOY_RESOLUTION,
        # Batches of 8 for 600 steps: at batch 2 or 120 steps the adapter turned the colours to
        # mush before it drew white on black (measured side by side; README "What the demo shows").
        "train_batch_size": 8,
        "max_train_steps": 600,
        "validation_steps": 200,  # a progress strip at steps 200, 400 and 600
        # The empty caption, which classifier-free guidance subtracts, learns the style too.
        "caption_dropout_probability": 0.1,
        "validation_guidance_real": TOY_GUIDANCE,  # where its held-out colours came out best
        # None is a caption of the demo's dataset (tests/test_learning.py checks).
        "validation_prompt": ["a yellow circle on a red background", "green stripes on a yellow background",
                              "a blue square on a orange background"],
    }


# With 36 the LoRA drew "a red circle on a blue background" as dark mush; with 72 and 108 as a white
# shape on black.
DEMO_IMAGES = 108


def write_demo(root: Path, count: int = DEMO_IMAGES) -> Path:
    """Dataset (every picture drawn white on black, captions naming other colours) + config under `root`;
    returns the config path."""
    root = Path(root)
    make_demo_dataset(root / "dataset", count=count, drawn_in=STYLE_COLOURS)
    config_path = root / "config.jsonc"
    body = json.dumps(style_demo_config(Path("dataset"), Path("output")), indent=2)
    config_path.write_text("// The demo: the toy Chroma learns to draw white on black from generated shapes, on a CPU. "
                           "Paths are relative to this file.\n" + body + "\n")
    return config_path
