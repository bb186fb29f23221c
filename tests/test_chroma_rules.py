"""Chroma's training rules, each against a hand computation or diffusers' ChromaPipeline."""

import torch
from diffusers import ChromaPipeline

from chroma_pipeline import flow
from chroma_pipeline.models import load_text_encoder, load_tokenizer, load_transformer
from chroma_pipeline.text import chroma_attention_mask, encode_prompts


def test_mask_keeps_real_tokens_plus_exactly_one_pad():
    tokenizer_mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]])
    assert chroma_attention_mask(tokenizer_mask).tolist() == [
        [1, 1, 1, 1, 0, 0],  # three real tokens and the first pad
        [1, 1, 1, 1, 1, 1],  # truncated caption: nothing left to pad
        [1, 1, 0, 0, 0, 0],  # only </s>, plus one pad
    ]


def test_cached_embeddings_match_chroma_pipeline_encoding(tiny_model_dir):
    tokenizer, encoder = load_tokenizer(tiny_model_dir), load_text_encoder(tiny_model_dir, torch.float32)
    prompts = ["a red circle on a blue background", ""]
    ours, our_mask = encode_prompts(prompts, tokenizer, encoder, 32, "unmodified", "cpu", torch.float32)
    pipe = ChromaPipeline.from_pretrained(tiny_model_dir, transformer=None, vae=None)
    theirs, their_mask = pipe._get_t5_prompt_embeds(prompts, max_sequence_length=32, device="cpu")
    torch.testing.assert_close(ours, theirs)
    assert torch.equal(our_mask, their_mask.long())


def test_zero_padding_zeroes_everything_past_the_mask(tiny_model_dir):
    tokenizer, encoder = load_tokenizer(tiny_model_dir), load_text_encoder(tiny_model_dir, torch.float32)
    embeds, mask = encode_prompts(["a cat"], tokenizer, encoder, 16, "zero", "cpu", torch.float32)
    open_positions = int(mask.sum())
    assert embeds[0, open_positions:].abs().sum() == 0
    assert embeds[0, :open_positions].abs().sum(dim=-1).min() > 0


def test_sigmas_are_pushed_toward_both_tails():
    sigmas = torch.tensor([0.0, 0.1, 0.4, 0.5, 0.6, 0.9, 1.0])
    expected = torch.tensor([0.0, 0.01, 0.16, 0.75, 0.84, 0.99, 1.0])
    torch.testing.assert_close(flow.tail_remap(sigmas), expected)
    sampled = flow.sample_sigmas(10_000, torch.Generator().manual_seed(0))
    assert 0 <= sampled.min() and sampled.max() <= 1
    # The logit-normal alone rarely goes below 0.1; after the remap the low tail is well visited.
    assert (sampled < 0.1).float().mean() > 0.1


def test_noisy_input_and_target_follow_flow_matching():
    x0 = torch.tensor([[[2.0, -1.0]]])
    noise = torch.tensor([[[0.5, 0.5]]])
    sigma = torch.tensor([0.25])
    torch.testing.assert_close(flow.add_noise(x0, noise, sigma), torch.tensor([[[1.625, -0.625]]]))
    torch.testing.assert_close(flow.flow_target(x0, noise), torch.tensor([[[-1.5, 1.5]]]))


def test_packing_and_position_ids_match_the_pipeline():
    latents = torch.randn(2, 16, 8, 12)
    packed = flow.pack_latents(latents)
    torch.testing.assert_close(packed, ChromaPipeline._pack_latents(latents, 2, 16, 8, 12))
    torch.testing.assert_close(flow.unpack_latents(packed, 8, 12), latents)
    ids = ChromaPipeline._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32)
    torch.testing.assert_close(flow.image_position_ids(8, 12), ids)


def test_attention_mask_is_text_mask_then_ones_for_image_tokens():
    text_mask = torch.tensor([[1, 1, 0, 0]])
    assert flow.joint_attention_mask(text_mask, 3).tolist() == [[True, True, False, False, True, True, True]]


class RecordingTransformer(torch.nn.Module):
    def forward(self, **kwargs):
        self.seen = kwargs
        return (kwargs["hidden_states"],)


def test_timestep_is_sigma_and_no_guidance_is_passed():
    model = RecordingTransformer()
    sigmas = torch.tensor([0.3, 0.7])
    flow.predict_velocity(model, torch.zeros(2, 4, 64), sigmas, torch.zeros(2, 5, 32), torch.ones(2, 5),
                          flow.image_position_ids(4, 4))
    torch.testing.assert_close(model.seen["timestep"], sigmas)  # the transformer multiplies by 1000 itself
    assert "guidance" not in model.seen


def test_masked_text_positions_do_not_change_the_prediction(tiny_model_dir):
    transformer = load_transformer(tiny_model_dir, torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    noisy = torch.randn(1, 16, 64, generator=generator)
    embeds = torch.randn(1, 8, 32, generator=generator)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0]])
    altered = embeds.clone()
    altered[:, 4:] = 100.0  # garbage in every masked position
    ids = flow.image_position_ids(8, 8)
    with torch.no_grad():
        a = flow.predict_velocity(transformer, noisy, torch.tensor([0.5]), embeds, mask, ids)
        b = flow.predict_velocity(transformer, noisy, torch.tensor([0.5]), altered, mask, ids)
        altered[:, 3] = 100.0  # ...but the open padding position does matter
        c = flow.predict_velocity(transformer, noisy, torch.tensor([0.5]), altered, mask, ids)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
