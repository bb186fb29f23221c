"""What each training step trains on: batches from one bucket each, their randomness, and loading them.

Every rank of a multi-process run walks the same endless batch order; rank r of N takes
every N-th batch. A batch's noise is fixed by its place in that order, not by who trains it.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import dataclass

import torch

from .config import ChromaConfig
from .latents import LatentEntry, load_latent_entry, scale_latents
from .text import load_embedding


@dataclass
class TrainingSample:
    latent: LatentEntry
    embedding_key: str
    dataset: str = ""  # the dataset's id: batches never mix datasets, and each has its own repeats

    @property
    def bucket(self) -> tuple[str, int, int]:
        return self.dataset, self.latent.bucket_width, self.latent.bucket_height


def bucket_batches(samples: list[TrainingSample], batch_size: int, seed: int, repeats: dict[str, int] | int = 0,
                   probability: dict[str, float] | None = None):
    """Endless batches, each from a single bucket of a single dataset.

    Every sample of dataset d appears 1 + `repeats[d]` times per epoch (SimpleTuner's meaning:
    0 = once). With several datasets, the next batch comes from dataset d with a chance
    proportional to `probability[d]` among the datasets with batches left in the epoch, so
    probability shapes the mix over time while every sample is still seen once per epoch.
    """
    datasets = sorted({sample.dataset for sample in samples})
    if isinstance(repeats, int):
        repeats = dict.fromkeys(datasets, repeats)
    by_bucket: dict[tuple[str, int, int], list[int]] = defaultdict(list)
    for index, sample in enumerate(samples):
        by_bucket[sample.bucket] += [index] * (1 + repeats.get(sample.dataset, 0))
    epoch = 0
    while True:
        rng = random.Random(seed * 1_000_003 + epoch)
        per_dataset: dict[str, list[list[int]]] = {dataset: [] for dataset in datasets}
        for bucket in sorted(by_bucket):
            indices = by_bucket[bucket][:]
            rng.shuffle(indices)
            per_dataset[bucket[0]] += [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
        for batches in per_dataset.values():
            rng.shuffle(batches)
        yield from _interleave(per_dataset, probability or {}, rng)
        epoch += 1


def _interleave(per_dataset: dict[str, list], probability: dict[str, float], rng: random.Random):
    if len(per_dataset) == 1:
        yield from next(iter(per_dataset.values()))
        return
    left = {dataset: list(reversed(batches)) for dataset, batches in per_dataset.items() if batches}
    while left:
        names = sorted(left)
        dataset = rng.choices(names, weights=[probability.get(name, 1.0) for name in names])[0]
        yield left[dataset].pop()
        if not left[dataset]:
            del left[dataset]


def batch_generator(seed: int, draw: int) -> torch.Generator:
    """The randomness of the `draw`-th batch of the shared order (posterior sample, caption dropout,
    sigmas, noise). Tied to the batch, not to a rank: 1 process accumulating 2 batches, 2 processes
    and 2 machines train on the same noise and end with the same adapter, and a resumed run needs
    no generator state to continue exactly."""
    return torch.Generator().manual_seed(seed * 1_000_003 + draw)


def total_steps(config: ChromaConfig, samples: list[TrainingSample], processes: int = 1) -> int:
    """`max_train_steps`, or `num_train_epochs` passes over the samples (with repeats) when that is set.

    Each step takes `gradient_accumulation_steps` batches on each of `processes` ranks.
    """
    if not config.num_train_epochs:  # SimpleTuner writes 0 for "use max_train_steps"
        return config.max_train_steps
    repeats = dataset_repeats(config)
    per_bucket = defaultdict(int)
    for sample in samples:
        per_bucket[sample.bucket] += 1 + repeats.get(sample.dataset, 0)
    batches = sum(math.ceil(count / config.train_batch_size) for count in per_bucket.values())
    return config.num_train_epochs * math.ceil(batches / (config.gradient_accumulation_steps * processes))


def samples_per_epoch(samples: list[TrainingSample], repeats: dict[str, int]) -> dict[str, int]:
    """How many samples each dataset contributes to one epoch: its images times 1 + its repeats."""
    counts = defaultdict(int)
    for sample in samples:
        counts[sample.dataset] += 1 + repeats.get(sample.dataset, 0)
    return dict(sorted(counts.items()))


def dataset_repeats(config: ChromaConfig) -> dict[str, int]:
    return {dataset.id: dataset.setting("repeats", config) for dataset in config.image_datasets}


def dataset_probability(config: ChromaConfig, samples: list[TrainingSample]) -> dict[str, float]:
    """Each dataset's weight in choosing the next batch: its `probability`, times its share of the
    samples under `data_backend_sampling: auto-weighting` (SimpleTuner's two modes)."""
    sizes = defaultdict(int)
    for sample in samples:
        sizes[sample.dataset] += 1
    return {dataset.id: dataset.probability * (sizes[dataset.id] / len(samples)
                                               if config.data_backend_sampling == "auto-weighting" else 1.0)
            for dataset in config.image_datasets}


def load_batch(batch, samples, latent_store, embedding_dir, vae_config, text_width, max_length, device, dtype, generator):
    latents, embeds, masks = [], [], []
    for index in batch:
        sample = samples[index]
        entry = load_latent_entry(latent_store, sample.latent, vae_config["latent_channels"])
        if entry is None:
            raise RuntimeError(f"latent cache entry for {sample.latent.path} is missing or corrupt: re-materialize image_latents")
        text = load_embedding(embedding_dir, sample.embedding_key, max_length, text_width)
        if text is None:
            raise RuntimeError(f"text embedding for {sample.latent.path} is missing or corrupt: re-materialize text_embeddings")
        # A fresh draw from the VAE posterior each time: free augmentation, as the VAE intends.
        eps = torch.randn(entry["std"].shape, generator=generator)
        latents.append(entry["mean"].float() + entry["std"].float() * eps)
        embeds.append(text["prompt_embeds"])
        masks.append(text["attention_mask"])
    x0 = scale_latents(torch.stack(latents), vae_config["shift_factor"], vae_config["scaling_factor"])
    # Latents stay fp32: the regression target is computed before anything is rounded to bf16.
    return x0.to(device), torch.stack(embeds).to(device, dtype), torch.stack(masks).to(device)


class Prefetched:
    """Items of an iterator, each made in a background thread while the caller works on the previous one.

    Reading a batch from the caches (and drawing its posterior sample) then overlaps the
    training step instead of adding to it. One item is in flight at a time, so the iterator
    advances in order, exactly as it would without the thread.
    """

    def __init__(self, items):
        from concurrent.futures import ThreadPoolExecutor

        self._items, self._pool = iter(items), ThreadPoolExecutor(1, thread_name_prefix="prefetch")
        self._next = self._pool.submit(next, self._items)

    def __next__(self):
        item = self._next.result()
        self._next = self._pool.submit(next, self._items)
        return item

    def __iter__(self):
        return self

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
