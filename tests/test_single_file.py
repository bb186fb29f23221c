"""A single original-format .safetensors transformer as the model source: converted once, exactly, never unpickled."""

import json

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import ChromaTransformer2DModel
from safetensors.torch import save_file

from chroma_pipeline import models
from chroma_pipeline.config import load_config
from chroma_pipeline.models import ModelSourceError
from chroma_pipeline.quantize import load_quantized, quantize_to_folder
from tests.conftest import write_config

# diffusers' Chroma converter assumes Chroma1's width (3072 = 24 heads of 128); depth and the
# approximator can be small. joint_attention_dim matches the tiny T5, so the tiny VAE and T5 fit.
WIDE_BUT_SHALLOW = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=32, axes_dims_rope=[16, 56, 56],
                        approximator_num_channels=16, approximator_hidden_dim=64, approximator_layers=1)
pytestmark = pytest.mark.slow


def to_original_layout(state: dict) -> dict:
    """diffusers names -> the BFL names Chroma checkpoints are shared with (fused q|k|v, and q|k|v|mlp)."""
    out, cat = {}, torch.cat
    for key, value in state.items():
        if key.startswith("distilled_guidance_layer."):
            out[key.replace("linear_1", "in_layer").replace("linear_2", "out_layer")
                .replace("norms.0.weight", "norms.0.scale")] = value
    for t in ("weight", "bias"):
        out[f"txt_in.{t}"], out[f"img_in.{t}"] = state[f"context_embedder.{t}"], state[f"x_embedder.{t}"]
        out[f"final_layer.linear.{t}"] = state[f"proj_out.{t}"]
        d, s = "transformer_blocks.0.", "single_transformer_blocks.0."
        out[f"double_blocks.0.img_attn.qkv.{t}"] = cat([state[f"{d}attn.to_{x}.{t}"] for x in "qkv"])
        out[f"double_blocks.0.txt_attn.qkv.{t}"] = cat([state[f"{d}attn.add_{x}_proj.{t}"] for x in "qkv"])
        out[f"double_blocks.0.img_attn.proj.{t}"] = state[f"{d}attn.to_out.0.{t}"]
        out[f"double_blocks.0.txt_attn.proj.{t}"] = state[f"{d}attn.to_add_out.{t}"]
        for ff, mlp in (("ff", "img_mlp"), ("ff_context", "txt_mlp")):
            out[f"double_blocks.0.{mlp}.0.{t}"] = state[f"{d}{ff}.net.0.proj.{t}"]
            out[f"double_blocks.0.{mlp}.2.{t}"] = state[f"{d}{ff}.net.2.{t}"]
        out[f"single_blocks.0.linear1.{t}"] = cat([*(state[f"{s}attn.to_{x}.{t}"] for x in "qkv"), state[f"{s}proj_mlp.{t}"]])
        out[f"single_blocks.0.linear2.{t}"] = state[f"{s}proj_out.{t}"]
    for ours, theirs in (("norm_q", "img_attn.norm.query_norm"), ("norm_k", "img_attn.norm.key_norm"),
                         ("norm_added_q", "txt_attn.norm.query_norm"), ("norm_added_k", "txt_attn.norm.key_norm")):
        out[f"double_blocks.0.{theirs}.scale"] = state[f"transformer_blocks.0.attn.{ours}.weight"]
    out["single_blocks.0.norm.query_norm.scale"] = state["single_transformer_blocks.0.attn.norm_q.weight"]
    out["single_blocks.0.norm.key_norm.scale"] = state["single_transformer_blocks.0.attn.norm_k.weight"]
    return {f"model.diffusion_model.{k}": v for k, v in out.items()}


@pytest.fixture(scope="module")
def single_file(tmp_path_factory):
    """A random wide-but-shallow Chroma saved the way fine-tunes are shared; returns (path, diffusers state)."""
    with init_empty_weights():
        skeleton = ChromaTransformer2DModel.from_config(WIDE_BUT_SHALLOW)
    generator = torch.Generator().manual_seed(0)
    state = {name: (torch.randn(p.shape, generator=generator) * 0.02).to(torch.bfloat16)
             for name, p in skeleton.named_parameters()}
    path = tmp_path_factory.mktemp("single") / "my-chroma-finetune.safetensors"
    save_file(to_original_layout(state), str(path))
    return path, state


def test_a_single_file_becomes_the_same_weights_in_a_diffusers_folder(single_file, tiny_model_dir, tmp_path):
    path, state = single_file
    config = load_config(write_config(tmp_path / "c.json", {"model_flavour": "tiny",
                                                            "pretrained_model_name_or_path": str(path)}))
    folder = models.resolve_model_dir(config, tmp_path / "models")
    converted = ChromaTransformer2DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=torch.bfloat16,
                                                         use_safetensors=True).state_dict()
    assert converted.keys() == state.keys()
    assert all(torch.equal(converted[name], state[name]) for name in state)
    # The other components come from the flavour (here the tiny one), and the conversion happens once.
    assert (folder / "vae" / "config.json").is_file() and (folder / "text_encoder").is_dir()
    assert models.resolve_model_dir(config, tmp_path / "models") == folder
    assert json.loads((folder / "transformer" / "config.json").read_text())["num_attention_heads"] == 24

    # And it quantizes block by block like any other checkpoint.
    quantize_to_folder(folder / "transformer", "int8-quanto", tmp_path / "q", {}, dtype=torch.bfloat16)
    assert load_quantized(tmp_path / "q", "cpu").config.num_layers == 1


def test_only_safetensors_single_files_are_accepted(tmp_path):
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"not loaded")
    config = load_config(write_config(tmp_path / "c.json", {"pretrained_model_name_or_path": str(pickle)}))
    with pytest.raises(ModelSourceError, match="only .safetensors single files"):
        models.resolve_model_dir(config, tmp_path / "models")


def test_without_network_or_a_local_copy_the_error_lists_every_way_to_provide_the_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    config = load_config(write_config(tmp_path / "c.json", {"model_flavour": "hd"}))
    with pytest.raises(ModelSourceError) as error:
        models.resolve_model_dir(config, tmp_path / "models")
    message = str(error.value)
    for way in ("network access", "local Hugging Face cache", "local diffusers folder", "single original-format",
                "model_flavour: tiny"):
        assert way in message
    assert "lodestones/Chroma1-HD" in message
