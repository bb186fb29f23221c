"""A config's notes (here an unknown key) are seen when the code location loads, each once, and in the UI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance

from assets.definitions import CONFIG_NOTES, build_definitions, materialize_chain
from tests.conftest import write_config

REPO = Path(__file__).resolve().parents[1]
NOTE = "unknown keys ignored: learning_ratee (did you mean learning_rate?)"
SCAN = ["dataset_folder", "raw_dataset/images", "raw_dataset/captions"]


@pytest.fixture
def misspelt(small_project, tmp_path) -> Path:
    return write_config(tmp_path / "misspelt.json", {**json.loads(small_project.read_text()), "learning_ratee": 1e-4})


def test_loading_the_code_location_says_it_once(misspelt, tmp_path):
    """What `dagster dev` prints when it loads the code location, as `dagster definitions validate` does."""
    env = {**os.environ, "CHROMA_CONFIG": str(misspelt), "DAGSTER_HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "dagster", "definitions", "validate", "-m", "assets.definitions"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (done.stdout + done.stderr).count(NOTE) == 1, done.stderr[-3000:]


def test_every_asset_shows_it_in_its_definition(misspelt):
    definitions = build_definitions(str(misspelt), "cpu")
    for name in ["raw_dataset/images", "raw_dataset/captions", "image_latents", "text_embeddings",
                 "quantized_base_model", "lora_adapter", "validation_grid"]:
        key = AssetKey.from_user_string(name)
        assert NOTE in definitions.get_assets_def(key).specs_by_key[key].metadata[CONFIG_NOTES].value, name


def test_a_clean_config_adds_no_notes(small_project):
    definitions = build_definitions(str(small_project), "cpu")
    key = AssetKey("lora_adapter")
    assert CONFIG_NOTES not in definitions.get_assets_def(key).specs_by_key[key].metadata


def test_a_run_says_it_once(misspelt):
    instance = DagsterInstance.ephemeral()
    result = materialize_chain(str(misspelt), instance, selection=SCAN, device="cpu")
    assert result.success
    assert [entry.message for entry in instance.all_logs(result.run_id) if NOTE in entry.message] != []
    assert len([entry for entry in instance.all_logs(result.run_id) if NOTE in entry.message]) == 1
