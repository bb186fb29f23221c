"""VAE latents per sample, cached by what decides them.

An entry's key is image content hash + bucket + crop + VAE identity + dtype, so a
replaced image, a new bucket or another VAE gets a new entry and an unchanged image is
never encoded twice. Entries store the VAE posterior's mean and std (unscaled), so
training can draw a fresh latent each time; the Chroma scaling is applied on use.
Entries live in safetensors shards (see shards.py), found through their key.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import torch

from .buckets import bucket_for, fit_to_bucket, to_model_input
from .dataset import ManifestRow
from .images import open_rgb
from .shards import ShardStore
from .storage import combine_hashes, read_rows, write_rows_atomic

VAE_DOWNSCALE = 8


@dataclass
class LatentEntry:
    path: str
    image_sha256: str
    bucket_width: int
    bucket_height: int
    cache_key: str
    # Whether every value is finite, seen when the entry was encoded (None: not known yet). Kept
    # with the index so a re-run trusts an entry from its shard's header and this flag alone.
    finite: bool | None = None
    fresh: bool = False  # encoded by the run that wrote this index: the checks read it back


@dataclass(frozen=True)
class Framing:
    """How an image becomes the pixels of its bucket (part of every cache key)."""

    crop: bool = True
    crop_style: str = "center"
    crop_aspect: str = "preserve"
    background: str = "white"


@dataclass(frozen=True)
class Bucketing:
    """One dataset's bucket size and framing; `read(relative path)` returns an image's stored bytes."""

    resolution: float
    resolution_type: str
    framing: Framing
    read: Callable[[str], bytes]  # picklable: VAE workers call it


def latent_cache_key(
    image_sha256: str, bucket: tuple[int, int], vae_identity: str, dtype: torch.dtype, framing: Framing = Framing()
) -> str:
    pixels = f"{'crop' if framing.crop else 'stretch'}:{framing.crop_style};alpha on {framing.background}"
    return combine_hashes(image_sha256, f"{bucket[0]}x{bucket[1]}", pixels, vae_identity, str(dtype))


def scale_latents(latents: torch.Tensor, shift_factor: float, scaling_factor: float) -> torch.Tensor:
    """Map raw VAE latents into the space the Chroma transformer was trained on."""
    return (latents - shift_factor) * scaling_factor


ENTRY_TENSORS = ("mean", "std")


def latent_shape(entry: LatentEntry, latent_channels: int) -> tuple[int, int, int]:
    return latent_channels, entry.bucket_height // VAE_DOWNSCALE, entry.bucket_width // VAE_DOWNSCALE


def load_latent_entry(store: ShardStore, entry: LatentEntry, latent_channels: int) -> dict[str, torch.Tensor] | None:
    """The cached mean/std, or None when missing or not trustworthy (truncated shard, wrong shape, NaN)."""
    tensors = store.get(entry.cache_key, ENTRY_TENSORS)
    shape = latent_shape(entry, latent_channels)
    if tensors is None or any(tuple(t.shape) != shape or not torch.isfinite(t).all() for t in tensors.values()):
        return None
    return tensors


def latent_entry_present(store: ShardStore, entry: LatentEntry, latent_channels: int) -> bool:
    """Whether the shard's header holds this entry's mean and std at its bucket's shape (no tensor is read)."""
    shapes = store.shapes(entry.cache_key, ENTRY_TENSORS)
    shape = latent_shape(entry, latent_channels)
    return shapes is not None and all(found == shape for found, _dtype in shapes.values())


def all_finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


class _BucketBatches(torch.utils.data.Dataset):
    """Each item is one ready batch of pixels from a single bucket, decoded and resized in a worker."""

    def __init__(self, batches: list[list[tuple[LatentEntry, Bucketing, str]]]):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> torch.Tensor:
        batch = self.batches[index]
        bucket = (batch[0][0].bucket_width, batch[0][0].bucket_height)
        return torch.stack([self._pixels(entry, bucketing, relative, bucket) for entry, bucketing, relative in batch])

    @staticmethod
    def _pixels(entry: LatentEntry, bucketing: Bucketing, relative: str, bucket: tuple[int, int]) -> torch.Tensor:
        # Decode the very bytes whose hash keys the entry: a file edited after the scan must not
        # leave its new pixels cached under the old content's key.
        data = bucketing.read(relative)
        if hashlib.sha256(data).hexdigest() != entry.image_sha256:
            raise RuntimeError(f"{entry.path} changed since the dataset scan: re-materialize raw_dataset, then image_latents")
        framing = bucketing.framing
        image = open_rgb(data, framing.background)
        return to_model_input(fit_to_bucket(image, bucket, framing.crop, framing.crop_style, seed=entry.image_sha256))


def encode_with_backoff(vae, pixels: torch.Tensor, log=print) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior's (mean, std); on out-of-memory, halve the batch instead of giving up."""
    try:
        posterior = vae.encode(pixels).latent_dist
        return posterior.mean, posterior.std
    except torch.OutOfMemoryError:
        if pixels.shape[0] == 1:
            raise torch.OutOfMemoryError(
                f"one {pixels.shape[-1]}x{pixels.shape[-2]} image does not fit through the VAE on this device: "
                "lower `resolution`, or free accelerator memory"
            ) from None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = pixels.shape[0] // 2
        log(f"out of memory at a batch of {pixels.shape[0]}; retrying as {half} + {pixels.shape[0] - half}")
        first, second = encode_with_backoff(vae, pixels[:half], log), encode_with_backoff(vae, pixels[half:], log)
        return torch.cat([first[0], second[0]]), torch.cat([first[1], second[1]])


def default_workers() -> int:
    return max(0, min(4, (os.cpu_count() or 1) - 1))


@torch.no_grad()
def encode_dataset(
    rows: list[ManifestRow],
    bucketing: dict[str, Bucketing],
    cache_dir: Path,
    load_vae,
    latent_channels: int,
    vae_identity: str,
    device: str,
    dtype: torch.dtype,
    batch_size: int = 4,
    workers: int | None = None,
    log=print,
    known_finite: dict[str, bool] | None = None,
) -> tuple[list[LatentEntry], dict[str, int]]:
    """Make sure every row has a valid cache entry; encode only those that do not.

    `bucketing` gives each dataset (by id) its bucket size, framing and reader. `load_vae`
    is called only when something needs encoding, so a warm cache costs no model load.
    Batches come from one bucket each; worker processes decode and resize the next batches
    while the VAE encodes the current one. An entry already cached is trusted from its shard's
    header and `known_finite` (cache key -> finite, from the previous index): no tensor is read
    unless that flag is unknown.
    """
    entries, jobs = [], {}
    for row in rows:
        settings = bucketing[row.dataset]
        framing = settings.framing
        bucket = bucket_for(row.width, row.height, settings.resolution, settings.resolution_type, framing.crop_aspect)
        key = latent_cache_key(row.image_sha256, bucket, vae_identity, dtype, framing)
        entry = LatentEntry(row.path, row.image_sha256, bucket[0], bucket[1], key)
        entries.append(entry)
        relative = row.path.removeprefix(f"{row.dataset}/") if row.dataset else row.path
        jobs.setdefault(key, (entry, settings, relative))  # two rows share a key only if they are the same image

    store = ShardStore(cache_dir)
    finite = {key: flag for key, flag in (known_finite or {}).items() if key in jobs}
    # An entry that was NaN when encoded is encoded again (a VAE overflow may not recur).
    missing = [job for key, job in jobs.items()
               if finite.get(key) is False or not latent_entry_present(store, job[0], latent_channels)]
    missing_keys = {job[0].cache_key for job in missing}
    for key in jobs.keys() - missing_keys - finite.keys():  # cached before the flag was kept: read once to learn it
        tensors = store.get(key, ENTRY_TENSORS)
        finite[key] = tensors is not None and all_finite(*tensors.values())

    def finish(encoded_keys: set[str]) -> tuple[list[LatentEntry], dict]:
        for entry in entries:
            entry.finite, entry.fresh = finite[entry.cache_key], entry.cache_key in encoded_keys
        return entries, {"encoded": len(encoded_keys), "reused": len(entries) - len(encoded_keys),
                         "encoded_keys": encoded_keys}

    if not missing:
        return finish(set())
    # After a crash this says how much of the killed run survived (committed chunk by chunk).
    log(f"{len(jobs) - len(missing)} of {len(jobs)} images have cached latents; encoding {len(missing)}")

    by_bucket: dict[tuple[int, int], list] = defaultdict(list)
    for job in missing:
        by_bucket[(job[0].bucket_width, job[0].bucket_height)].append(job)
    batches = [
        bucket_jobs[start : start + batch_size]
        for _, bucket_jobs in sorted(by_bucket.items())
        for start in range(0, len(bucket_jobs), batch_size)
    ]
    workers = default_workers() if workers is None else workers
    loader = torch.utils.data.DataLoader(
        _BucketBatches(batches), batch_size=None, num_workers=workers if len(batches) > 1 else 0,
    )

    vae = load_vae()
    encoded, started = 0, time.perf_counter()
    for batch, pixels in zip(batches, loader, strict=True):
        mean, std = encode_with_backoff(vae, pixels.to(device=device, dtype=dtype), log)
        for i, (entry, _, _) in enumerate(batch):
            store.put(entry.cache_key, {"mean": mean[i], "std": std[i]})
            finite[entry.cache_key] = all_finite(mean[i], std[i])
        encoded += len(batch)
        rate = encoded / (time.perf_counter() - started)
        log(f"encoded {encoded}/{len(missing)} images, {rate:.1f} images/s, ETA {(len(missing) - encoded) / rate:.0f}s")
    store.flush()
    return finish(missing_keys)


def write_latent_index(entries: list[LatentEntry], path: Path) -> None:
    write_rows_atomic(entries, _INDEX_SCHEMA, path)


def read_latent_index(path: Path) -> list[LatentEntry]:
    return read_rows(path, LatentEntry, "image_latents")


_INDEX_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("image_sha256", pa.string()),
        ("bucket_width", pa.int32()),
        ("bucket_height", pa.int32()),
        ("cache_key", pa.string()),
        ("finite", pa.bool_()),
        ("fresh", pa.bool_()),
    ]
)
