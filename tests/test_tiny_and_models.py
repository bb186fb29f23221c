"""The offline tiny flavour is a real Chroma in the diffusers layout, identical on every build."""

import hashlib

import pytest
import torch
from safetensors.torch import load_file, save_file

from chroma_pipeline import models
from chroma_pipeline.config import ChromaConfig
from chroma_pipeline.tiny import build_tiny_chroma


def _file_hashes(folder):
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*")) if path.is_file()
    }


def test_same_seed_same_bytes(tmp_path, tiny_model_dir):
    again = build_tiny_chroma(tmp_path / "again")
    assert _file_hashes(again) == _file_hashes(tiny_model_dir)


def test_saved_in_the_diffusers_layout_with_safetensors_only(tiny_model_dir):
    names = set(_file_hashes(tiny_model_dir))
    assert {"model_index.json", "transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors", "tokenizer/tokenizer.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]


def test_loads_through_the_same_code_as_real_flavours(tmp_path):
    config = ChromaConfig(model_flavour="tiny")
    model_dir = models.resolve_model_dir(config, tmp_path)
    transformer = models.load_transformer(model_dir, torch.float32)
    vae = models.load_vae(model_dir, torch.float32)
    encoder = models.load_text_encoder(model_dir, torch.float32)
    tokenizer = models.load_tokenizer(model_dir)
    assert type(transformer).__name__ == "ChromaTransformer2DModel"
    assert vae.config.latent_channels == 16 and len(vae.config.block_out_channels) == 4  # 8x, like Flux's VAE
    assert encoder.config.d_model == transformer.config.joint_attention_dim
    assert tokenizer("a red circle").input_ids[-1] == tokenizer.eos_token_id


def test_a_missing_real_model_says_what_to_provide(tmp_path):
    config = ChromaConfig(model_flavour="base")  # HF_HUB_OFFLINE=1 in the tests: no local copy, no network
    with pytest.raises(models.ModelSourceError) as error:
        models.resolve_model_dir(config, tmp_path)
    message = str(error.value)
    assert "lodestones/Chroma1-Base" in message and "pretrained_model_name_or_path" in message and "tiny" in message


def test_a_folder_that_is_not_a_diffusers_model_is_refused(tmp_path):
    config = ChromaConfig(pretrained_model_name_or_path=str(tmp_path))
    with pytest.raises(models.ModelSourceError, match="model_index.json"):
        models.resolve_model_dir(config, tmp_path / "models")


def test_component_identity_follows_config_and_weight_content(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    copy = build_tiny_chroma(tmp_path / "tiny")
    original = models.component_identity(tiny_model_dir, "vae")
    assert models.component_identity(copy, "vae") == original
    assert models.component_identity(copy, "vae") != models.component_identity(copy, "transformer")

    # A fine-tune with the same shapes: same file size, other numbers.
    weights = copy / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    save_file({name: t * 2 + 1 for name, t in tensors.items()}, weights)
    assert models.component_identity(copy, "vae") != original

    fresh = build_tiny_chroma(tmp_path / "again")
    (fresh / "vae" / "config.json").write_text((fresh / "vae" / "config.json").read_text().replace("0.3611", "0.3612"))
    assert models.component_identity(fresh, "vae") != original


def test_a_single_file_that_is_not_a_chroma_transformer_gets_a_clear_message(tmp_path, tiny_model_dir):
    # (A real one is converted: tests/test_single_file.py.)
    empty = tmp_path / "chroma-unlocked-v50.safetensors"
    empty.write_bytes(b"")
    vae_weights = tiny_model_dir / "vae" / "diffusion_pytorch_model.safetensors"
    for path, expected in ((empty, "not a readable safetensors file"), (vae_weights, "not an original-format Chroma")):
        config = ChromaConfig(model_flavour="tiny", pretrained_model_name_or_path=str(path))
        with pytest.raises(models.ModelSourceError, match=expected):
            models.resolve_model_dir(config, tmp_path / "models")


@pytest.mark.parametrize("source", ["/no/such/chroma", "./models/missing", "~/nowhere/chroma"])
def test_a_missing_local_model_path_is_caught_before_any_work(source):
    with pytest.raises(models.ModelSourceError, match="does not exist"):
        models.check_model_source(ChromaConfig(pretrained_model_name_or_path=source))


def test_hub_ids_are_not_mistaken_for_local_paths():
    models.check_model_source(ChromaConfig(pretrained_model_name_or_path="lodestones/Chroma1-HD"))
