"""Latent and embedding caches: only what changed is encoded, and a bad entry is never trusted."""

from pathlib import Path

import pytest
from diffusers import AutoencoderKL
from PIL import Image

import chroma_pipeline.text as text_module
from chroma_pipeline import models
from chroma_pipeline.config import load_config
from chroma_pipeline.device import detect_device
from chroma_pipeline.steps import Layout, build_embeddings, build_latents, build_manifest
from tests.conftest import write_config


@pytest.fixture
def counters(monkeypatch):
    """Count images through the VAE encoder and texts through T5."""
    counts = {"images": 0, "texts": 0}
    original_encode = AutoencoderKL.encode

    def counting_encode(self, pixels, *args, **kwargs):
        counts["images"] += pixels.shape[0]
        return original_encode(self, pixels, *args, **kwargs)

    original_prompts = text_module.encode_prompts

    def counting_prompts(texts, *args, **kwargs):
        counts["texts"] += len(texts)
        return original_prompts(texts, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", counting_encode)
    monkeypatch.setattr(text_module, "encode_prompts", counting_prompts)
    return counts


def _run(config_path: Path):
    config = load_config(config_path)
    layout = Layout(Path(config.output_dir))
    build_manifest(config, layout)
    device = detect_device("cpu")
    return build_latents(config, layout, device, log=lambda _: None), build_embeddings(config, layout, device, log=lambda _: None)


def test_second_run_encodes_nothing_and_loads_no_model(small_project, counters, monkeypatch):
    first_latents, first_texts = _run(small_project)
    # 9 captions, the empty caption, 2 validation prompts; the negative prompt "" is the empty caption.
    assert counters == {"images": 9, "texts": 12}

    def no_model(*args, **kwargs):
        raise AssertionError("a warm cache must not load a model")

    monkeypatch.setattr(models, "load_vae", no_model)
    monkeypatch.setattr(models, "load_text_encoder", no_model)
    latents, texts = _run(small_project)
    assert counters["images"] == 9 and counters["texts"] == 12
    assert (latents.data_version, texts.data_version) == (first_latents.data_version, first_texts.data_version)
    assert latents.stats["reused"] == 9 and texts.stats["encoded"] == 0


def test_edited_caption_reencodes_exactly_that_caption(small_project, counters):
    _, first_texts = _run(small_project)
    caption = sorted((small_project.parent / "dataset").glob("*.txt"))[3]
    caption.write_text("a completely new caption")
    latents, texts = _run(small_project)
    assert counters["texts"] == 12 + 1
    assert counters["images"] == 9  # latents untouched
    assert texts.stats["encoded"] == 1 and texts.data_version != first_texts.data_version


def test_replaced_image_reencodes_exactly_that_image(small_project, counters):
    first_latents, _ = _run(small_project)
    image = sorted((small_project.parent / "dataset").glob("*.png"))[0]
    Image.new("RGB", Image.open(image).size, "pink").save(image)
    latents, texts = _run(small_project)
    assert counters["images"] == 9 + 1 and counters["texts"] == 12
    assert latents.stats["encoded"] == 1 and latents.data_version != first_latents.data_version


def test_truncated_cache_entry_is_recomputed_not_trusted(small_project, counters):
    _run(small_project)
    entry = sorted((small_project.parent / "output" / "cache" / "latents").rglob("*.safetensors"))[0]
    entry.write_bytes(entry.read_bytes()[:100])
    latents, _ = _run(small_project)
    assert latents.stats["encoded"] == 1 and counters["images"] == 10


def test_changing_encoder_settings_reencodes_every_text(small_project, counters):
    _run(small_project)
    values = __import__("json").loads(small_project.read_text())
    write_config(small_project, {**values, "tokenizer_max_length": 32})
    _, texts = _run(small_project)
    assert texts.stats["encoded"] == 12 and counters["images"] == 9
