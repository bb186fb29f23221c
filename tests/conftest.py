import json
import os
from pathlib import Path

import pytest

# Nothing in the tests may reach the network: a stray download fails instead of hanging.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from chroma_pipeline.demo_data import demo_config, make_demo_dataset  # noqa: E402
from chroma_pipeline.tiny import build_tiny_chroma  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_chroma(tmp_path_factory.mktemp("models") / "tiny")


# Everything training reads, materialized before a test trains on its own.
CACHE_STEPS = ["raw_dataset/images", "raw_dataset/captions", "image_latents", "text_embeddings", "quantized_base_model"]


def write_config(path: Path, values: dict) -> Path:
    path.write_text(json.dumps(values, indent=2))
    return path


@pytest.fixture
def small_project(tmp_path) -> Path:
    """A 9-image demo dataset and a config that trains for a few steps; returns the config path."""
    make_demo_dataset(tmp_path / "dataset", count=9)
    values = demo_config(tmp_path / "dataset", tmp_path / "output")
    values.update(max_train_steps=12, validation_num_inference_steps=4, validation_seed=[7])
    return write_config(tmp_path / "config.json", values)
