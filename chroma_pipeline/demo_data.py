"""A generated demo dataset: coloured shapes in three aspect ratios, one `.txt` caption each.

Nothing binary is committed; the same seed draws the same images.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "purple": (140, 60, 190), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "stripes")
SIZES = {"square": (256, 256), "landscape": (384, 256), "portrait": (256, 384)}


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, size: tuple[int, int], colour, rng: random.Random) -> None:
    w, h = size
    r = min(w, h) * rng.uniform(0.22, 0.34)
    cx, cy = w * rng.uniform(0.35, 0.65), h * rng.uniform(0.35, 0.65)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    else:
        stripe = max(8, int(r / 3))
        for x in range(0, w, 2 * stripe):
            draw.rectangle((x, 0, x + stripe - 1, h), fill=colour)


def make_demo_dataset(folder: Path, count: int = 36, seed: int = 0) -> list[Path]:
    """Write `count` images with distinct captions into `folder`; returns the image paths."""
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
    chosen = []
    layouts = list(SIZES)
    for i in range(count):
        layout = layouts[i % len(layouts)]
        combo = next(c for c in combos if c[3] == layout and c not in chosen)
        chosen.append(combo)

    paths = []
    for index, (fg, shape, bg, layout) in enumerate(chosen):
        size = SIZES[layout]
        image = Image.new("RGB", size, COLOURS[bg])
        _draw_shape(ImageDraw.Draw(image), shape, size, COLOURS[fg], rng)
        stem = f"{index:03d}-{fg}-{shape}-{layout}"
        path = folder / f"{stem}.png"
        image.save(path)
        subject = f"{fg} stripes" if shape == "stripes" else f"a {fg} {shape}"
        (folder / f"{stem}.txt").write_text(f"{subject} on a {bg} background, {layout} picture\n")
        paths.append(path)
    return paths


def demo_config(dataset_dir: Path, output_dir: Path) -> dict:
    """A tiny-flavour config that runs the whole chain on 2 CPU cores in a few minutes."""
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


def write_demo(root: Path, count: int = 36) -> Path:
    """Dataset + config under `root`; returns the config path."""
    root = Path(root)
    make_demo_dataset(root / "dataset", count=count)
    config_path = root / "config.jsonc"
    body = json.dumps(demo_config(Path("dataset"), Path("output")), indent=2)
    config_path.write_text("// The demo: tiny Chroma, generated shapes, CPU. Paths are relative to this file.\n" + body + "\n")
    return config_path
