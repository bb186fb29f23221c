"""The Chroma flow-matching rules, one small function each.

    x0      clean latents (scaled, packed)       noise ~ N(0, I)
    sigma   noise level in [0, 1]                x_sigma = (1 - sigma) * x0 + sigma * noise
    target  the velocity the model predicts      v = noise - x0

Chroma samples sigma from a logit-normal and then pushes it toward both tails
(sigma^2 below 0.5, 1 - (1 - sigma)^2 above), feeds sigma itself as the timestep (the
transformer multiplies by 1000), trains no guidance embedding, and attends to the text
mask joined with ones for every image token.
"""

from __future__ import annotations

import torch


def tail_remap(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.where(sigmas < 0.5, sigmas**2, 1 - (1 - sigmas) ** 2)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """SimpleTuner's `flow_schedule_shift`: s > 1 moves sigmas toward noise (s = 1, or 0, leaves them)."""
    if shift in (0, 1):
        return sigmas
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sample_sigmas(batch_size: int, generator: torch.Generator | None = None, shift: float = 1.0) -> torch.Tensor:
    """Logit-normal sigmas, shifted (if asked) and then pushed toward both tails, in SimpleTuner's order."""
    logit_normal = torch.sigmoid(torch.randn(batch_size, generator=generator))
    return tail_remap(shift_sigmas(logit_normal, shift))


def add_noise(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    sigmas = sigmas.view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
    return (1 - sigmas) * latents + sigmas * noise


def flow_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - latents


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C * 4): each 2x2 latent patch becomes one image token."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
    b, _, packed_channels = tokens.shape
    c = packed_channels // 4
    patches = tokens.view(b, latent_height // 2, latent_width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, c, latent_height, latent_width)


def image_position_ids(latent_height: int, latent_width: int) -> torch.Tensor:
    """RoPE ids (0, row, column) for each packed image token."""
    rows = torch.arange(latent_height // 2).repeat_interleave(latent_width // 2)
    cols = torch.arange(latent_width // 2).repeat(latent_height // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).float()


def text_position_ids(num_text_tokens: int) -> torch.Tensor:
    return torch.zeros(num_text_tokens, 3)


def joint_attention_mask(text_mask: torch.Tensor, num_image_tokens: int) -> torch.Tensor:
    """[text mask | ones]: image tokens always attend; text attends only to real tokens + one pad."""
    image_mask = torch.ones(text_mask.shape[0], num_image_tokens, dtype=torch.bool, device=text_mask.device)
    return torch.cat([text_mask.bool(), image_mask], dim=1)


def predict_velocity(transformer, noisy_tokens, sigmas, prompt_embeds, text_mask, image_ids) -> torch.Tensor:
    return transformer(
        hidden_states=noisy_tokens,
        timestep=sigmas.to(noisy_tokens.dtype),  # sigma, not sigma * 1000: the model scales it
        encoder_hidden_states=prompt_embeds,
        txt_ids=text_position_ids(prompt_embeds.shape[1]).to(noisy_tokens.device),
        img_ids=image_ids.to(noisy_tokens.device),
        attention_mask=joint_attention_mask(text_mask, noisy_tokens.shape[1]),
        return_dict=False,
    )[0]
