"""The held-out validation loss: samples training never sees, at fixed sigmas and fixed noise."""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

from .batches import TrainingSample, load_batch
from .errors import DatasetError
from .flow import add_noise, flow_target, image_position_ids, pack_latents, predict_velocity

# Held-out loss is measured at these sigmas with noise fixed by the seed, so the number moves
# only when the adapter does: comparable across evaluations, runs and retrains.
HELD_OUT_SIGMAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def split_held_out(samples: list[TrainingSample], share: float, seed: int):
    """(training samples, held-out samples): a stable `share`, chosen by image content, so renames keep the split."""
    if share <= 0:
        return samples, []
    # By image, not by sample: an image in two datasets (two resolutions) is held out of both.
    images = sorted({s.latent.image_sha256 for s in samples},
                    key=lambda image: hashlib.sha256(f"{seed}:{image}".encode()).hexdigest())
    count = max(1, round(share * len(images)))
    if count >= len(images):
        raise DatasetError(f"validation_loss_share {share} of {len(images)} images leaves none to train on")
    held = set(images[:count])
    return ([s for s in samples if s.latent.image_sha256 not in held],
            [s for s in samples if s.latent.image_sha256 in held])


@torch.no_grad()
def held_out_loss(transformer, held: list[TrainingSample], load: dict, seed: int) -> float:
    """The flow-matching loss on samples training never sees, at fixed sigmas and fixed noise."""
    generator = torch.Generator().manual_seed(seed)  # the same posterior draws and noise at every evaluation
    device, dtype = load["device"], load["dtype"]
    total = 0.0
    for index in range(len(held)):
        x0, prompt_embeds, text_mask = load_batch([index], **{**load, "samples": held}, generator=generator)
        latents = pack_latents(x0)
        image_ids = image_position_ids(x0.shape[2], x0.shape[3])
        for sigma in HELD_OUT_SIGMAS:
            noise = torch.randn(latents.shape, generator=generator).to(device)
            sigmas = torch.full((1,), sigma, device=device)
            velocity = predict_velocity(transformer, add_noise(latents, noise, sigmas).to(dtype), sigmas,
                                        prompt_embeds, text_mask, image_ids)
            total += F.mse_loss(velocity.float(), flow_target(latents, noise).float()).item()
    return total / (len(held) * len(HELD_OUT_SIGMAS))
