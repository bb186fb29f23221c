"""Validation renders: prompts x seeds, base model beside the LoRA, in one labelled grid.

Prompts arrive as cached embeddings, so T5 is never loaded here. `guidance_real` is
the pipeline's `guidance_scale`: 1.0 is a single pass, above 1 is classifier-free
guidance against the negative prompt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

LABEL_HEIGHT = 28
MIN_CELL_WIDTH = 192
# The settings that decide what a render shows; the renders made while training are tagged with them.
VALIDATION_SETTINGS = (
    "validation_prompts", "validation_negative_prompt", "validation_seed", "validation_guidance_real",
    "validation_num_inference_steps", "validation_resolution",
)


@dataclass
class Cell:
    prompt: str
    seed: int
    variant: str  # "base", "lora" or "step N"
    image: Image.Image
    non_finite: bool = False  # the decoded image had NaN/inf before it became 8-bit pixels

    @property
    def problem(self) -> str | None:
        """Why this image is useless to judge an adapter by, or None."""
        if self.non_finite:
            return "NaN/inf values"
        pixels = np.asarray(self.image, dtype=np.float32)
        if pixels.max() < 8.0:
            return "all black"
        if pixels.std() < 1.0:
            return "blank (one flat colour)"
        return None

    @property
    def name(self) -> str:
        return f"{self.variant} / {self.prompt[:30]} / seed {self.seed}"


def make_pipeline(transformer, vae, scheduler):
    from diffusers import ChromaPipeline

    return ChromaPipeline(scheduler=scheduler, vae=vae, transformer=transformer, text_encoder=None, tokenizer=None)


@torch.no_grad()
def render(pipe, variant, prompts, embeddings, negative, seeds, guidance, steps, size, device) -> list[Cell]:
    cells = []
    dtype = pipe.transformer.dtype
    for prompt in prompts:
        prompt_embeds, prompt_mask = embeddings[prompt]
        for seed in seeds:
            image = pipe(
                # Boolean masks on purpose: the float 0/1 mask ChromaPipeline builds itself reaches
                # scaled_dot_product_attention as an additive bias and masks nothing (diffusers #12116).
                prompt_embeds=prompt_embeds[None].to(device, dtype),
                prompt_attention_mask=prompt_mask[None].to(device).bool(),
                negative_prompt_embeds=negative[0][None].to(device, dtype),
                negative_prompt_attention_mask=negative[1][None].to(device).bool(),
                guidance_scale=guidance,
                num_inference_steps=steps,
                height=size,
                width=size,
                generator=torch.Generator("cpu").manual_seed(seed),
                output_type="np",  # floats, so NaN is still visible; 8-bit pixels would turn it black
            ).images[0]
            non_finite = not np.isfinite(image).all()
            pixels = (np.nan_to_num(image, nan=0.0).clip(0, 1) * 255).round().astype(np.uint8)
            cells.append(Cell(prompt, seed, variant, Image.fromarray(pixels), non_finite))
    return cells


def assemble_grid(cells: list[Cell], prompts: list[str], seeds: list[int], guidance: float, steps: int) -> Image.Image:
    """Rows are prompts; columns are seeds, each as a base | LoRA pair.

    Renders narrower than MIN_CELL_WIDTH (the toy model's 64 px) are enlarged pixel for pixel,
    so the labels fit and the pictures can be looked at; nothing is smoothed in.
    """
    scale = max(1, math.ceil(MIN_CELL_WIDTH / cells[0].image.width))
    size = cells[0].image.width * scale, cells[0].image.height * scale
    columns = [(seed, variant) for seed in seeds for variant in ("base", "lora")]
    cell_w, cell_h = size[0], size[1] + LABEL_HEIGHT
    grid = Image.new("RGB", (cell_w * len(columns), cell_h * len(prompts)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=10)
    lookup = {(c.prompt, c.seed, c.variant): c for c in cells}
    for row, prompt in enumerate(prompts):
        for column, (seed, variant) in enumerate(columns):
            x, y = column * cell_w, row * cell_h
            picture = lookup[(prompt, seed, variant)].image
            grid.paste(picture.resize(size, Image.Resampling.NEAREST), (x, y + LABEL_HEIGHT))
            excerpt = prompt if len(prompt) <= 40 else prompt[:37] + "..."
            draw.text((x + 3, y + 2), excerpt, fill="black", font=font)
            draw.text((x + 3, y + 14), f"{variant} seed {seed} cfg {guidance:g} {steps} steps", fill="dimgray", font=font)
    return grid


def progress_strip(cells: list[Cell], step: int) -> Image.Image:
    """One row, the LoRA at `step` on every prompt and seed, labelled with the step."""
    width, height = cells[0].image.size
    strip = Image.new("RGB", (width * len(cells), height + LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(strip)
    font = ImageFont.load_default(size=10)
    for column, cell in enumerate(cells):
        strip.paste(cell.image, (column * width, LABEL_HEIGHT))
        excerpt = cell.prompt if len(cell.prompt) <= 40 else cell.prompt[:37] + "..."
        draw.text((column * width + 3, 2), f"step {step}", fill="black", font=font)
        draw.text((column * width + 3, 14), f"{excerpt} / seed {cell.seed}", fill="dimgray", font=font)
    return strip


def stack(strips: list[Image.Image]) -> Image.Image:
    """Strips one under the other: the adapter's progress from the first checkpoint to the last."""
    width = max(strip.width for strip in strips)
    sheet = Image.new("RGB", (width, sum(strip.height for strip in strips)), "white")
    y = 0
    for strip in strips:
        sheet.paste(strip, (0, y))
        y += strip.height
    return sheet


def adapter_is_active(transformer) -> bool:
    """diffusers only logs a warning when LoRA keys match nothing; check the layers really changed."""
    return any(hasattr(module, "lora_A") and len(module.lora_A) > 0 for module in transformer.modules())
