"""The validation grid: what it renders, how it is labelled, and what it refuses to call a good image."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from dagster import DagsterInstance
from diffusers import ChromaTransformer2DModel
from PIL import Image

from assets._versions import STEP_SETTINGS
from assets.definitions import materialize_chain
from chroma_pipeline import models
from chroma_pipeline.config import ConfigError, load_config
from chroma_pipeline.device import detect_device
from chroma_pipeline.grid import MIN_CELL_WIDTH, Cell, assemble_grid, make_pipeline, render
from chroma_pipeline.layout import Layout
from chroma_pipeline.validation_grid import build_grid
from tests.conftest import write_config


def test_a_cell_says_why_it_is_useless():
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    assert Cell("p", 1, "lora", noise).problem is None
    assert Cell("p", 1, "lora", Image.new("RGB", (16, 16), "black")).problem == "all black"
    assert Cell("p", 1, "lora", Image.new("RGB", (16, 16), "grey")).problem == "blank (one flat colour)"
    assert Cell("p", 1, "lora", noise, non_finite=True).problem == "NaN/inf values"


def test_small_renders_are_enlarged_pixel_for_pixel_so_labels_fit():
    render_64 = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    cells = [Cell("a red circle", 1, variant, render_64) for variant in ("base", "lora")]
    grid = assemble_grid(cells, ["a red circle"], [1], guidance=1.0, steps=8)
    scale = MIN_CELL_WIDTH // 64
    assert grid.width == 2 * 64 * scale
    picture = grid.crop((0, grid.height - 64 * scale, 64 * scale, grid.height))
    assert picture.tobytes() == render_64.resize((64 * scale, 64 * scale), Image.Resampling.NEAREST).tobytes()
    # Renders already wide enough are pasted as they are.
    grid = assemble_grid([Cell("p", 1, v, render_64.resize((256, 256))) for v in ("base", "lora")], ["p"], [1], 1.0, 8)
    assert grid.width == 2 * 256


@pytest.fixture(scope="module")
def tiny_pipe(tiny_model_dir):
    pipe = make_pipeline(
        models.load_transformer(tiny_model_dir, torch.float32), models.load_vae(tiny_model_dir, torch.float32),
        models.load_scheduler(tiny_model_dir),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _text(seed: int, width: int):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(16, dtype=torch.long)
    mask[:5] = 1
    return torch.randn(16, width, generator=generator), mask


def _render(pipe, guidance: float, negative_seed: int, seeds=(3,)):
    width = pipe.transformer.config.joint_attention_dim
    cells = render(pipe, "base", prompts=["a"], embeddings={"a": _text(0, width)}, negative=_text(negative_seed, width),
                   seeds=list(seeds), guidance=guidance, steps=2, size=64, device="cpu")
    return [np.asarray(cell.image) for cell in cells]


def test_guidance_one_is_a_single_pass_and_above_one_uses_the_negative_prompt(tiny_pipe):
    # validation_guidance_real is the pipeline's guidance_scale: at 1.0 the negative prompt is never used.
    assert np.array_equal(_render(tiny_pipe, 1.0, negative_seed=1)[0], _render(tiny_pipe, 1.0, negative_seed=2)[0])
    assert not np.array_equal(_render(tiny_pipe, 3.0, negative_seed=1)[0], _render(tiny_pipe, 3.0, negative_seed=2)[0])
    assert not np.array_equal(_render(tiny_pipe, 1.0, negative_seed=1)[0], _render(tiny_pipe, 3.0, negative_seed=1)[0])


def test_the_same_seed_gives_the_same_image_and_another_seed_another(tiny_pipe):
    first, second = _render(tiny_pipe, 1.0, 1, seeds=(3, 4))
    again, _ = _render(tiny_pipe, 1.0, 1, seeds=(3, 4))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, second)


def test_nan_from_the_model_is_reported_not_drawn_black(tiny_pipe, monkeypatch):
    forward = ChromaTransformer2DModel.forward

    def nan_forward(self, *args, **kwargs):
        output = forward(self, *args, **kwargs)
        return (torch.full_like(output[0], float("nan")),)

    monkeypatch.setattr(ChromaTransformer2DModel, "forward", nan_forward)
    width = tiny_pipe.transformer.config.joint_attention_dim
    (cell,) = render(tiny_pipe, "lora", prompts=["a"], embeddings={"a": _text(0, width)}, negative=_text(1, width),
                     seeds=[3], guidance=1.0, steps=2, size=64, device="cpu")
    assert cell.problem == "NaN/inf values"


def test_prompt_library_adds_prompts_and_its_content_is_a_setting(small_project):
    library = small_project.parent / "prompts.json"
    library.write_text(json.dumps({"cat": "a cat on a sofa", "dog": "a dog in the snow"}))
    values = {**json.loads(small_project.read_text()), "validation_prompt": "a red circle",
              "user_prompt_library": "prompts.json"}  # relative to the config file
    config = load_config(write_config(small_project, values))
    assert config.validation_prompts == ["a red circle", "a cat on a sofa", "a dog in the snow"]

    # Editing the library re-encodes and re-renders; it never retrains.
    before = {step: config.settings_hash(*keys) for step, keys in STEP_SETTINGS.items()}
    library.write_text(json.dumps(["a cat on a sofa", "a horse"]))
    after = {step: load_config(small_project).settings_hash(*keys) for step, keys in STEP_SETTINGS.items()}
    assert {step for step in before if before[step] != after[step]} == {"text_embeddings", "validation_grid"}

    library.write_text('{"cat": ""}')
    with pytest.raises(ConfigError, match="user_prompt_library"):
        load_config(small_project)
    library.unlink()
    with pytest.raises(ConfigError, match="prompts.json is not a file"):
        load_config(small_project)


@pytest.mark.slow
def test_grid_is_reproducible_labelled_stored_and_shows_training_progress(small_project, monkeypatch):
    values = json.loads(small_project.read_text())
    values.update(validation_seed=[7, 8], validation_steps=6, max_train_steps=12)
    write_config(small_project, values)
    result = materialize_chain(str(small_project), DagsterInstance.ephemeral(), device="cpu")
    assert result.success
    grid_meta = result.asset_materializations_for_node("validation_grid")[0].metadata
    grid_path = Path(grid_meta["grid path"].value)
    folder = grid_path.parent

    # Rows are prompts, columns are seeds as base | LoRA pairs; every cell is stored on its own too.
    prompts = values["validation_prompt"]
    cells = sorted(p.name for p in folder.glob("*-p*-s*.png"))
    assert cells == sorted(f"{v}-p{i}-s{s}.png" for v in ("base", "lora") for i in range(len(prompts)) for s in (7, 8))
    cell = Image.open(folder / cells[0])
    grid = Image.open(grid_path)
    assert grid.size == (cell.width * 4, (cell.height + 28) * len(prompts))

    # Progress while training: one strip per validation_steps (steps 6 and 12), in the adapter and the grid.
    adapter = Path(result.asset_materializations_for_node("lora_adapter")[0].metadata["adapter"].value)
    assert sorted(p.name for p in adapter.parent.glob("progress/*.png")) == ["step_000006.png", "step_000012.png"]
    assert Image.open(folder / "progress.png").height == 2 * (cell.height + 28)
    assert grid_meta["progress during training"].value.startswith("![progress](data:image/png;base64,")

    # The same seeds give the same grid: render again from scratch and compare pixels,
    # with the prompt embeddings from the cache (T5 must not even load).
    first = np.asarray(grid)
    shutil.rmtree(folder)

    def no_text_encoder(*args, **kwargs):
        raise AssertionError("the grid loaded T5")

    monkeypatch.setattr(models, "load_text_encoder", no_text_encoder)
    config = load_config(small_project)
    again = build_grid(config, Layout(Path(config.output_dir)), detect_device("cpu"))
    assert again.path == grid_path
    assert np.array_equal(np.asarray(Image.open(again.path)), first)


@pytest.mark.slow
def test_the_grid_check_fails_when_the_lora_renders_nan(small_project, monkeypatch):
    instance = DagsterInstance.ephemeral()
    assert materialize_chain(str(small_project), instance, device="cpu").success
    forward = ChromaTransformer2DModel.forward

    def nan_forward(self, *args, **kwargs):
        output = forward(self, *args, **kwargs)
        return (torch.full_like(output[0], float("nan")),)

    monkeypatch.setattr(ChromaTransformer2DModel, "forward", nan_forward)
    values = json.loads(small_project.read_text())
    write_config(small_project, {**values, "validation_num_inference_steps": 3})  # a new grid, rendered as NaN
    result = materialize_chain(str(small_project), instance, selection=["validation_grid"], device="cpu",
                               raise_on_error=False)
    (evaluation,) = result.get_asset_check_evaluations()
    assert evaluation.check_name == "grid_not_blank" and not evaluation.passed
    assert "NaN/inf values" in evaluation.description
