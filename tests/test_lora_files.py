"""Both adapter files apply at the trained strength: each module's delta equals PEFT's own B @ A * alpha / rank.

diffusers' kohya converter assumes Chroma1's width (3072) when it splits fused modules, so
this uses the wide-but-shallow random Chroma of the single-file tests rather than the tiny one.
"""

import itertools
import logging

import pytest
import torch
from diffusers import ChromaPipeline, ChromaTransformer2DModel
from safetensors.torch import load_file

from chroma_pipeline.lora import apply_adapter, lora_config, save_adapter
from tests.test_single_file import WIDE_BUT_SHALLOW

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    with torch.device("meta"):
        model = ChromaTransformer2DModel.from_config(WIDE_BUT_SHALLOW)
    model = model.to_empty(device="cpu")  # base weights do not matter for deltas; skip the slow random init
    return model.requires_grad_(False)


def _deltas(model, adapter: str) -> dict[str, torch.Tensor]:
    return {name: module.get_delta_weight(adapter) for name, module in model.named_modules()
            if hasattr(module, "lora_A") and adapter in module.lora_A}


@pytest.mark.parametrize(("preset", "rank", "alpha"), [("all+ffs", 4, 16.0), ("all", 4, 4.0)])
def test_diffusers_and_kohya_files_give_exactly_the_trained_deltas(transformer, tmp_path, caplog, preset, rank, alpha):
    transformer.add_adapter(lora_config(rank, alpha, preset, transformer.config.num_single_layers), adapter_name="default")
    generator = torch.Generator().manual_seed(1)
    for name, parameter in transformer.named_parameters():
        if "lora_" in name:
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.01  # B too: not the zero init
    expected = _deltas(transformer, "default")
    save_adapter(transformer, tmp_path)
    transformer.delete_adapters("default")

    pipe = ChromaPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=transformer)
    loaders = {"ChromaPipeline.load_lora_weights": lambda path: pipe.load_lora_weights(str(path), adapter_name="loaded"),
               "our grid and checks (quanto-safe)": lambda path: apply_adapter(transformer, path, "loaded")}
    for file, (how, load) in itertools.product(
            ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"), loaders.items()):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            load(tmp_path / file)
        # ("No LoRA keys ... prefix='text_encoder'" is expected: this LoRA has no text encoder part.)
        about_transformer = [r.getMessage() for r in caplog.records if "text_encoder" not in r.getMessage()]
        assert not about_transformer, f"{file}: {about_transformer}"
        got = _deltas(transformer, "loaded")
        for name, delta in expected.items():
            torch.testing.assert_close(got[name], delta, rtol=1e-4, atol=1e-7, msg=f"{file} via {how}: {name}")
        for name in got.keys() - expected.keys():  # a fused part the LoRA did not train: present, but zero
            assert torch.count_nonzero(got[name]) == 0, f"{file} via {how}: {name}"
        transformer.delete_adapters("loaded")

    kohya = load_file(tmp_path / "pytorch_lora_weights_kohya.safetensors")
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in kohya
    assert kohya["lora_unet_double_blocks_0_img_attn_qkv.alpha"].item() == 3 * alpha  # 3 parts of rank `rank`
    assert kohya["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape[0] == rank * (4 if "ffs" in preset else 3)
    assert not any(k.startswith("diffusion_model.") for k in kohya)  # the layout that loads nowhere
