"""The memory estimate against what a real-width Chroma keeps, measured on the CPU.

`auto` and the "does not fit" refusal trust `memory.estimate`. Parameter and LoRA bytes are
counted exactly; the activations the backward pass keeps are measured here as the tensors
autograd saves (frozen weights excluded) on 2 double + 2 single blocks of Chroma1's width.
"""

import pytest
import torch

from chroma_pipeline.flow import image_position_ids, predict_velocity
from chroma_pipeline.lora import lora_config, target_modules
from chroma_pipeline.memory import estimate

# Chroma1's width, two blocks of each kind, a small approximator (it only sees the timestep).
WIDTH = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=128,
             num_attention_heads=24, joint_attention_dim=4096, axes_dims_rope=[16, 56, 56],
             approximator_num_channels=64, approximator_hidden_dim=256, approximator_layers=1)
TEXT_TOKENS = 512


@pytest.fixture(scope="module")
def chroma():
    from diffusers import ChromaTransformer2DModel

    torch.manual_seed(0)
    model = ChromaTransformer2DModel.from_config(WIDTH).to(torch.bfloat16)
    model.requires_grad_(False)
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model.add_adapter(lora_config(16, 16, "all", WIDTH["num_single_layers"]))
    return model, base_bytes


def saved_for_backward(model, side: int, checkpointing: bool) -> int:
    """Bytes of the tensors autograd keeps for the backward pass during one forward (weights excluded)."""
    if checkpointing:
        model.enable_gradient_checkpointing()
    else:
        model.disable_gradient_checkpointing()
    model.train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters() if not p.requires_grad}
    kept = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    latent = side // 8
    noisy = torch.randn(1, (latent // 2) ** 2, 64, dtype=torch.bfloat16)
    prompt_embeds = torch.randn(1, TEXT_TOKENS, 4096, dtype=torch.bfloat16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        predict_velocity(model, noisy, torch.tensor([0.5]), prompt_embeds, torch.ones(1, TEXT_TOKENS, dtype=torch.long),
                         image_position_ids(latent, latent))
    return sum(kept.values())


def estimated(side: int, checkpointing: bool, precision: str = "no_change"):
    return estimate(WIDTH, precision, rank=16, lora_pattern=target_modules("all", WIDTH["num_single_layers"]),
                    bucket=(side, side), text_tokens=TEXT_TOKENS, gradient_checkpointing=checkpointing)


def test_weights_and_lora_bytes_are_counted_exactly(chroma):
    model, base_bytes = chroma
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ours = estimated(256, True)
    assert ours.weights == base_bytes
    assert ours.lora == trainable * 16  # fp32 parameter, gradient and AdamW's two moments


@pytest.mark.parametrize("side", [256, 512])
def test_activations_without_checkpointing_are_within_15_percent_of_what_the_backward_keeps(chroma, side):
    measured = saved_for_backward(chroma[0], side, checkpointing=False)
    assert estimated(side, False).activations == pytest.approx(measured, rel=0.15)


@pytest.mark.parametrize("side", [256, 512])
def test_with_checkpointing_each_block_keeps_its_input_only(chroma, side):
    """The forward keeps the block inputs; the estimate adds the one block recomputed during the
    backward (its internals, as measured without checkpointing), which a forward cannot show."""
    from chroma_pipeline.memory import INSIDE_DOUBLE

    measured = saved_for_backward(chroma[0], side, checkpointing=True)
    hidden_state = ((side // 16) ** 2 + TEXT_TOKENS) * 3072 * 2
    forward_part = estimated(side, True).activations - INSIDE_DOUBLE * hidden_state
    assert forward_part == pytest.approx(measured, rel=0.15)
