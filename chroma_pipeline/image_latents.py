"""Step `image_latents`: VAE latents of every usable image in its aspect bucket; only new or changed images are encoded."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from . import models
from .config import ChromaConfig
from .dataset import read_manifest, usable
from .device import DeviceInfo
from .latents import Framing, encode_dataset, write_latent_index
from .layout import Layout, StepResult
from .storage import combine_hashes

SETTINGS = (
    "output_dir", *models.MODEL_SETTINGS, "resolution", "resolution_type", "alpha_background", "crop", "crop_style",
    "crop_aspect",
)


def build_latents(config: ChromaConfig, layout: Layout, device: DeviceInfo, log=print) -> StepResult:
    rows = usable(read_manifest(layout.manifest))
    model_dir = models.resolve_model_dir(config, layout.models_dir)
    dtype = device.compute_dtype(config.mixed_precision)

    def load_vae():  # only when an image needs encoding: a fully cached re-run never loads it
        log(f"loading VAE from {model_dir}")
        return models.load_vae(model_dir, dtype).to(device.torch_device).eval()

    entries, stats = encode_dataset(
        rows, Path(config.instance_data_dir), layout.latent_dir, load_vae,
        latent_channels=models.vae_config(model_dir)["latent_channels"],
        vae_identity=models.component_identity(model_dir, "vae"),
        resolution=config.resolution, resolution_type=config.resolution_type,
        framing=Framing(config.crop, config.crop_style, config.crop_aspect, config.alpha_background),
        device=device.torch_device, dtype=dtype, workers=config.vae_workers, log=log,
        # On CPU one image at a time beat batches of 8 by 2x (benchmarks/latent_cache.py); GPUs like batches.
        batch_size=config.vae_batch_size or (1 if device.kind == "cpu" else 4),
    )
    device.empty_cache()
    write_latent_index(entries, layout.latent_index)
    buckets = Counter(f"{e.bucket_width}x{e.bucket_height}" for e in entries)
    stats.update(samples=len(entries), buckets=dict(sorted(buckets.items())))
    return StepResult(combine_hashes(*sorted(f"{e.path}:{e.cache_key}" for e in entries)), layout.latent_index, stats)
