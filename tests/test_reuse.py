"""What each change costs: the steps rerun only what a change really touches."""

import json
from pathlib import Path

import pytest

import chroma_pipeline.grid as grid_module
import chroma_pipeline.training as train_module
from chroma_pipeline.config import load_config
from chroma_pipeline.device import detect_device
from chroma_pipeline.image_latents import build_latents
from chroma_pipeline.layout import Layout
from chroma_pipeline.lora_adapter import build_adapter
from chroma_pipeline.quantized_base import build_quantized
from chroma_pipeline.raw_dataset import build_manifest
from chroma_pipeline.text_embeddings import build_embeddings
from chroma_pipeline.validation_grid import build_grid
from tests.conftest import write_config


@pytest.fixture
def calls(monkeypatch):
    counts = {"train": 0, "render": 0}
    train, render = train_module.train_lora, grid_module.render

    def counting_train(*args, **kwargs):
        counts["train"] += 1
        return train(*args, **kwargs)

    def counting_render(*args, **kwargs):
        counts["render"] += 1
        return render(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_lora", counting_train)
    monkeypatch.setattr(grid_module, "render", counting_render)
    return counts


def _chain(config_path: Path) -> dict:
    config = load_config(config_path)
    layout, device, quiet = Layout(Path(config.output_dir)), detect_device("cpu"), (lambda _: None)
    results = {"raw_dataset": build_manifest(config, layout)[0]}
    for name, step in [("image_latents", build_latents), ("text_embeddings", build_embeddings),
                       ("quantized_base_model", build_quantized), ("lora_adapter", build_adapter),
                       ("validation_grid", build_grid)]:
        results[name] = step(config, layout, device, log=quiet)
    return results


@pytest.mark.slow
def test_a_new_validation_prompt_rerenders_the_grid_but_never_retrains(small_project, calls):
    first = _chain(small_project)
    assert calls == {"train": 1, "render": 2}  # base and LoRA
    values = json.loads(small_project.read_text())
    write_config(small_project, {**values, "validation_prompt": ["purple triangle on a white background"]})
    second = _chain(small_project)
    assert calls == {"train": 1, "render": 4}
    assert second["lora_adapter"].data_version == first["lora_adapter"].data_version
    assert second["validation_grid"].data_version != first["validation_grid"].data_version


@pytest.mark.slow
def test_renaming_files_recomputes_nothing_and_a_new_learning_rate_only_retrains(small_project, calls):
    first = _chain(small_project)
    dataset = small_project.parent / "dataset"
    for path in sorted(dataset.iterdir()):
        path.rename(path.with_name("renamed-" + path.name))
    second = _chain(small_project)
    assert calls == {"train": 1, "render": 2}
    for name in ("quantized_base_model", "lora_adapter", "validation_grid"):
        assert second[name].data_version == first[name].data_version, name
    # Only the record of which file holds what moved: index updates, no encoding, no training.
    assert second["image_latents"].stats["encoded"] == 0 and second["text_embeddings"].stats["encoded"] == 0

    values = json.loads(small_project.read_text())
    write_config(small_project, {**values, "learning_rate": 5e-4})
    third = _chain(small_project)
    assert calls == {"train": 2, "render": 4}
    for name in ("raw_dataset", "image_latents", "text_embeddings", "quantized_base_model"):
        assert third[name].data_version == second[name].data_version
    assert third["lora_adapter"].data_version != second["lora_adapter"].data_version
