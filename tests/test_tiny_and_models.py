"""The offline tiny flavour is a real Chroma in the diffusers layout, identical on every build."""

import hashlib

import pytest
import torch

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


def test_component_identity_changes_with_the_weights(tmp_path, tiny_model_dir):
    copy = build_tiny_chroma(tmp_path / "tiny")
    assert models.component_identity(copy, "vae") == models.component_identity(tiny_model_dir, "vae")
    assert models.component_identity(copy, "vae") != models.component_identity(copy, "transformer")
    (copy / "vae" / "config.json").write_text((copy / "vae" / "config.json").read_text().replace("0.3611", "0.3612"))
    assert models.component_identity(copy, "vae") != models.component_identity(tiny_model_dir, "vae")
