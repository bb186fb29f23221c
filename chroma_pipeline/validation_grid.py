"""Step `validation_grid`: the validation prompts x seeds, base model beside the LoRA, in one labelled PNG.

Prompts come from the text cache, so T5 is never loaded; the adapter is the one
`plan_adapter` names for the current data and settings.
"""

from __future__ import annotations

import json

from PIL import Image

from . import grid, models
from .config import ChromaConfig
from .device import DeviceInfo
from .grid import VALIDATION_SETTINGS, adapter_is_active, assemble_grid, make_pipeline, stack
from .layout import Layout, StepResult
from .lora import apply_adapter
from .lora_adapter import plan_adapter
from .quantized_base import load_base_transformer
from .storage import atomic_dir, combine_hashes, write_json_atomic
from .text_embeddings import cached_prompts

SETTINGS = ("output_dir", *VALIDATION_SETTINGS)


def build_grid(config: ChromaConfig, layout: Layout, device: DeviceInfo, log=print) -> StepResult:
    plan = plan_adapter(config, layout, device)
    if not plan.weights.is_file():
        raise FileNotFoundError(f"no adapter for the current data and settings at {plan.weights}: materialize lora_adapter first")

    prompts, embeddings, negative, prompt_keys = cached_prompts(config, layout)
    key = combine_hashes(plan.key, config.settings_hash(*VALIDATION_SETTINGS), *prompt_keys)
    folder = layout.grid_dir(key)
    grid_path = folder / "grid.png"
    if grid_path.is_file() and (folder / "grid.json").is_file():
        log(f"reusing validation grid {grid_path}: same adapter, prompts and settings")
        summary = json.loads((folder / "grid.json").read_text())
        return StepResult(key, grid_path, {**summary, "reused": True})

    model_dir = models.resolve_model_dir(config, layout.models_dir)
    dtype = device.compute_dtype(config.mixed_precision)
    transformer = load_base_transformer(config, layout, device)
    vae = models.load_vae(model_dir, dtype).to(device.torch_device)
    pipe = make_pipeline(transformer, vae, models.load_scheduler(model_dir))
    pipe.set_progress_bar_config(disable=True)
    options = dict(
        prompts=prompts, embeddings=embeddings, negative=negative, seeds=config.validation_seeds,
        guidance=config.validation_guidance_real, steps=config.validation_num_inference_steps,
        size=config.validation_size, device=device.torch_device,
    )
    log(f"rendering {len(prompts)} prompts x {len(config.validation_seeds)} seeds, base model")
    cells = grid.render(pipe, "base", **options)
    apply_adapter(pipe.transformer, plan.weights, "validation")
    if not adapter_is_active(pipe.transformer):
        raise RuntimeError(f"{plan.weights} loaded but changed no layer of the transformer: its keys match nothing")
    log("rendering with the LoRA")
    cells += grid.render(pipe, "lora", **options)

    picture = assemble_grid(cells, prompts, config.validation_seeds, config.validation_guidance_real,
                         config.validation_num_inference_steps)
    blank = [f"{c.name}: {c.problem}" for c in cells if c.problem]
    # The renders made while training, one strip per `validation_steps`, oldest first; only when
    # they show the current prompts and settings (the adapter is reused across prompt edits).
    strips = [Image.open(path).convert("RGB") for path in sorted(plan.folder.glob("progress/step_*.png"))]
    tag = plan.folder / "progress" / "settings.json"
    if strips and (not tag.is_file() or json.loads(tag.read_text())["validation"] != config.settings_hash(*VALIDATION_SETTINGS)):
        log("progress strips left out: they were rendered with other validation prompts or settings (the next "
            "training run renders new ones)")
        strips = []
    summary = {"cells": len(cells), "blank_cells": blank, "adapter": str(plan.weights), "progress_strips": len(strips)}
    with atomic_dir(folder) as staging:
        for cell in cells:
            cell.image.save(staging / f"{cell.variant}-p{prompts.index(cell.prompt)}-s{cell.seed}.png")
        picture.save(staging / "grid.png", format="PNG")
        if strips:
            stack(strips).save(staging / "progress.png", format="PNG")
        write_json_atomic(staging / "grid.json", summary)
    return StepResult(key, grid_path, {**summary, "reused": False})
