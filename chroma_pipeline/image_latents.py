"""Step `image_latents`: VAE latents of every usable image in its aspect bucket; only new or changed images are encoded."""

from __future__ import annotations

import functools
from collections import Counter, defaultdict

from . import models
from .config import ChromaConfig
from .dataset import read_manifest, usable
from .device import DeviceInfo
from .latents import Bucketing, Framing, encode_dataset, read_latent_index, write_latent_index
from .layout import Layout, StepResult
from .sources import read_image
from .storage import combine_hashes

SETTINGS = (
    "output_dir", *models.MODEL_SETTINGS, "resolution", "resolution_type", "alpha_background", "crop", "crop_style",
    "crop_aspect", "dataset_framing",
)


def dataset_bucketing(config: ChromaConfig) -> dict[str, Bucketing]:
    """Each dataset's bucket size and framing (its own settings, else the main config's) and reader."""
    return {
        dataset.id: Bucketing(
            resolution=dataset.setting("resolution", config), resolution_type=dataset.setting("resolution_type", config),
            framing=Framing(dataset.setting("crop", config), dataset.setting("crop_style", config),
                            dataset.setting("crop_aspect", config), config.alpha_background),
            read=functools.partial(read_image, dataset),
        )
        for dataset in config.image_datasets
    }


def build_latents(config: ChromaConfig, layout: Layout, device: DeviceInfo, log=print) -> StepResult:
    rows = usable(read_manifest(layout.manifest))
    model_dir = models.resolve_model_dir(config, layout.models_dir)
    dtype = device.compute_dtype(config.mixed_precision)

    def load_vae():  # only when an image needs encoding: a fully cached re-run never loads it
        log(f"loading VAE from {model_dir}")
        return models.load_vae(model_dir, dtype).to(device.torch_device).eval()

    # What the last run saw of each entry (finite or not): trusted again, with the shard's header.
    previous = read_latent_index(layout.latent_index) if layout.latent_index.is_file() else []
    entries, stats = encode_dataset(
        rows, dataset_bucketing(config), layout.latent_dir, load_vae,
        known_finite={e.cache_key: e.finite for e in previous if e.finite is not None},
        latent_channels=models.vae_config(model_dir)["latent_channels"],
        vae_identity=models.component_identity(model_dir, "vae"),
        device=device.torch_device, dtype=dtype, workers=config.vae_workers, log=log,
        # On CPU one image at a time beat batches of 8 by 2x (benchmarks/latent_cache.py); GPUs like batches.
        batch_size=config.vae_batch_size or (1 if device.kind == "cpu" else 4),
    )
    device.empty_cache()
    if entries != previous:  # an unchanged index is not rewritten: a no-op re-run writes nothing
        write_latent_index(entries, layout.latent_index)
    buckets = Counter(f"{e.bucket_width}x{e.bucket_height}" for e in entries)
    stats.update(samples=len(entries), buckets=dict(sorted(buckets.items())))
    encoded_keys = stats.pop("encoded_keys")
    if config.named_datasets:  # each dataset keeps its own buckets
        per_dataset = defaultdict(lambda: {"samples": 0, "encoded": 0, "buckets": Counter()})
        for row, entry in zip(rows, entries, strict=True):
            counts = per_dataset[row.dataset]
            counts["samples"] += 1
            counts["encoded"] += entry.cache_key in encoded_keys
            counts["buckets"][f"{entry.bucket_width}x{entry.bucket_height}"] += 1
        stats["datasets"] = {d: {**c, "buckets": dict(sorted(c["buckets"].items()))} for d, c in sorted(per_dataset.items())}
    return StepResult(combine_hashes(*sorted(f"{e.path}:{e.cache_key}" for e in entries)), layout.latent_index, stats)
