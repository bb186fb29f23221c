"""The whole chain through Dagster on the tiny flavour, as a user runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dagster import AssetKey, AssetRecordsFilter, DagsterInstance, materialize
from diffusers import AutoencoderKL, ChromaPipeline
from safetensors.torch import load_file

import chroma_pipeline.grid as grid_module
import chroma_pipeline.quantize as quantize_module
import chroma_pipeline.text as text_module
import chroma_pipeline.training as train_module
from assets._dagster_tags import DATA_VERSION_TAG, input_data_version_tag
from assets.definitions import build_definitions, materialize_chain
from chroma_pipeline.config import ConfigError
from tests.conftest import write_config

REPO = Path(__file__).resolve().parents[1]
EDGES = {
    "dataset_folder": set(),  # observed, never materialized: the user's folder
    "raw_dataset/images": {"dataset_folder"},
    "raw_dataset/captions": {"dataset_folder"},
    "image_latents": {"raw_dataset/images"},
    "text_embeddings": {"raw_dataset/captions"},
    "quantized_base_model": set(),
    "lora_adapter": {"image_latents", "text_embeddings", "quantized_base_model"},
    "validation_grid": {"lora_adapter", "quantized_base_model", "text_embeddings"},
}
MATERIALIZED = [name for name in EDGES if name != "dataset_folder"]


def test_code_location_has_the_six_steps_and_their_lineage(small_project):
    # Six steps; raw_dataset is one scan with two assets (images, captions) so each branch has its own version,
    # and the folder it scans is an observed source asset, so the UI shows when the folder changed.
    defs = build_definitions(str(small_project))
    graph = defs.resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert keys == set(EDGES)
    assert defs.get_assets_def(AssetKey(["raw_dataset", "images"])).node_def.name == "raw_dataset"
    for name, parents in EDGES.items():
        assert {k.to_user_string() for k in graph.get(AssetKey.from_user_string(name)).parent_keys} == parents


@pytest.fixture
def work_counter(monkeypatch):
    counts = {"vae": 0, "t5": 0, "quantize": 0, "train": 0, "render": 0}
    encode, prompts, quantize = AutoencoderKL.encode, text_module.encode_prompts, quantize_module.quantize_to_folder
    train, render = train_module.train_lora, grid_module.render

    def count(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(AutoencoderKL, "encode", count("vae", encode))
    monkeypatch.setattr(text_module, "encode_prompts", count("t5", prompts))
    monkeypatch.setattr(quantize_module, "quantize_to_folder", count("quantize", quantize))
    monkeypatch.setattr(train_module, "train_lora", count("train", train))
    monkeypatch.setattr(grid_module, "render", count("render", render))
    return counts


def _materialize(config_path, instance):
    result = materialize_chain(str(config_path), instance, device="cpu")
    assert result.success
    return {
        event.asset_key.to_user_string(): event.step_materialization_data.materialization
        for event in result.get_asset_materialization_events()
    }


@pytest.mark.slow
def test_chain_materializes_then_second_run_recomputes_nothing(small_project, work_counter, tmp_path):
    instance = DagsterInstance.ephemeral()
    first = _materialize(small_project, instance)
    assert set(first) == set(MATERIALIZED)
    assert work_counter["vae"] > 0 and work_counter["t5"] > 0
    assert (work_counter["quantize"], work_counter["train"], work_counter["render"]) == (1, 1, 2)  # reloaded, not redone

    grid = Path(first["validation_grid"].metadata["grid path"].value)
    assert grid.is_file() and grid.stat().st_size > 0
    assert first["validation_grid"].metadata["grid"].value.startswith("![validation grid](data:image/png;base64,")
    assert first["lora_adapter"].metadata["steps"].value == 12
    adapter = Path(first["lora_adapter"].metadata["adapter"].value)
    assert adapter.name == "pytorch_lora_weights.safetensors"

    before = dict(work_counter)
    second = _materialize(small_project, instance)
    assert work_counter == before, "an unchanged dataset must not encode, embed, quantize, train or render again"
    for name in MATERIALIZED:
        assert second[name].tags[DATA_VERSION_TAG] == first[name].tags[DATA_VERSION_TAG], name
    assert second["lora_adapter"].metadata["retrained"].value is False


@pytest.mark.slow
def test_trained_adapter_loads_in_chroma_pipeline_and_changes_the_output(small_project, tiny_model_dir):
    values = json.loads(small_project.read_text())
    write_config(small_project, {**values, "max_train_steps": 30})
    events = _materialize(small_project, DagsterInstance.ephemeral())
    adapter = Path(events["lora_adapter"].metadata["adapter"].value)
    assert all(key.startswith("transformer.") for key in load_file(adapter))

    pipe = ChromaPipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)

    def render():
        return pipe("a red circle on a blue background", height=128, width=128, num_inference_steps=4,
                    guidance_scale=1.0, max_sequence_length=64, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    weight = pipe.transformer.transformer_blocks[0].attn.to_q.weight.detach().clone()
    base = render()
    pipe.load_lora_weights(str(adapter))
    with_lora = render()
    # load_lora_weights only warns when no key matches: check the layers really carry the adapter.
    assert hasattr(pipe.transformer.transformer_blocks[0].attn.to_q, "lora_A")
    assert torch.equal(pipe.transformer.transformer_blocks[0].attn.to_q.weight, weight)  # adapter, not merged
    assert (with_lora - base).abs().max() > 1e-4


def test_a_config_that_does_not_load_fails_the_code_location_with_the_reason(tmp_path):
    config = write_config(tmp_path / "bad.json", {"model_flavour": "turbo"})
    with pytest.raises(ConfigError, match="model_flavour"):
        build_definitions(str(config))
    with pytest.raises(ConfigError, match="not found"):
        build_definitions(str(tmp_path / "missing.json"))


def test_a_run_with_other_settings_than_the_loaded_code_location_is_refused(small_project, tmp_path):
    other = write_config(tmp_path / "other.json", {**json.loads(small_project.read_text()), "learning_rate": 0.5})
    defs = build_definitions(str(small_project), device="cpu")  # what the UI loaded
    resources = {**defs.resources, "chroma": build_definitions(str(other)).resources["chroma"]}  # launchpad override
    result = materialize(list(defs.assets), resources=resources, instance=DagsterInstance.ephemeral(),
                         selection=["raw_dataset/images", "raw_dataset/captions", "image_latents", "text_embeddings",
                                    "quantized_base_model", "lora_adapter"], raise_on_error=False)
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert failure.step_key == "lora_adapter" and "Reload the code location" in str(failure.event_specific_data.error)


def test_bad_config_fails_before_any_work(tmp_path):
    # A good config when the code location loaded, broken before the run: the run fails at start.
    paths = {"output_dir": str(tmp_path / "out"), "instance_data_dir": str(tmp_path / "data")}
    good = write_config(tmp_path / "good.json", paths)
    defs = build_definitions(str(good), device="cpu")
    write_config(good, {"model_flavour": "turbo", **paths})
    result = materialize(list(defs.assets), resources=defs.resources, instance=DagsterInstance.ephemeral(),
                         raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_failure)
    assert "model_flavour" in str(failure.event_specific_data.error) and "'turbo'" in str(failure.event_specific_data.error)
    assert not (tmp_path / "out").exists()
    assert not result.get_asset_materialization_events()


@pytest.mark.slow
def test_dagster_cli_materializes_exactly_six_assets_in_order(small_project, tmp_path):
    env = {**os.environ, "CHROMA_CONFIG": str(small_project), "CHROMA_DEVICE": "cpu", "DAGSTER_HOME": str(tmp_path)}
    # `*` selects what can be materialized; naming the observed folder too observes it first, as `full_chain` does.
    run = subprocess.run(
        [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "assets.definitions", "--select", "dataset_folder,*"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    instance = DagsterInstance.from_config(str(tmp_path))
    # The folder is observed once, before the scan, so the scan's lineage names the content it read.
    observed = instance.fetch_observations(AssetKey("dataset_folder"), limit=10).records
    assert len(observed) == 1
    materialized_at = {"dataset_folder": observed[0].storage_id}
    for name in MATERIALIZED:
        records = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=AssetKey.from_user_string(name)), limit=10
        ).records
        assert len(records) == 1, f"{name} materialized {len(records)} times"
        materialized_at[name] = records[0].storage_id
        if "dataset_folder" in EDGES[name]:
            recorded = records[0].asset_materialization.tags[input_data_version_tag(AssetKey("dataset_folder"))]
            assert recorded == observed[0].asset_observation.data_version, name
    for name, parents in EDGES.items():  # dependency order: every parent before its child
        assert all(materialized_at[parent] < materialized_at[name] for parent in parents), name
