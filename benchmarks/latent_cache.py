"""The latent cache on one generated dataset: batched by bucket vs one image at a time, and a re-run.

Encodes the same images with the tiny VAE three ways, in one run, side by side:
batched by bucket with decode workers, one image at a time, and a re-materialization
after one image changed (as a fraction of the full batched run).

    python benchmarks/latent_cache.py [--images 120] [--resolution 512]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from chroma_pipeline.config import config_from_dict  # noqa: E402
from chroma_pipeline.device import detect_device  # noqa: E402
from chroma_pipeline.image_latents import build_latents  # noqa: E402
from chroma_pipeline.layout import Layout  # noqa: E402
from chroma_pipeline.raw_dataset import build_manifest  # noqa: E402

SIZES = [(768, 512), (512, 768), (640, 640), (1024, 576)]


def make_images(folder: Path, count: int) -> None:
    folder.mkdir(parents=True)
    for i in range(count):
        image = Image.new("RGB", SIZES[i % len(SIZES)], (i % 256, (7 * i) % 256, (13 * i) % 256))
        ImageDraw.Draw(image).ellipse((40, 40, 200 + i % 100, 220), fill=(255 - i % 256, 90, 30))
        image.save(folder / f"{i:05d}.jpg", quality=92)
        (folder / f"{i:05d}.txt").write_text(f"image {i}")


def timed_build(values: dict, layout: Layout) -> tuple[float, dict]:
    config = config_from_dict(values)
    build_manifest(config, layout)
    started = time.perf_counter()
    result = build_latents(config, layout, detect_device("cpu"), log=lambda _: None)
    return time.perf_counter() - started, result.stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--resolution", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 1)))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_images(root / "dataset", args.images)
        base = {"model_flavour": "tiny", "instance_data_dir": str(root / "dataset"), "resolution": args.resolution}

        batched, _ = timed_build({**base, "output_dir": str(root / "batched"), "vae_batch_size": 8}, Layout(root / "batched"))
        no_workers, _ = timed_build(
            {**base, "output_dir": str(root / "no-workers"), "vae_batch_size": 8, "vae_workers": 0}, Layout(root / "no-workers")
        )
        single, _ = timed_build(
            {**base, "output_dir": str(root / "single"), "vae_batch_size": 1, "vae_workers": 0}, Layout(root / "single")
        )
        Image.new("RGB", (640, 640), "orange").save(root / "dataset" / "00002.jpg")
        rerun, stats = timed_build({**base, "output_dir": str(root / "batched"), "vae_batch_size": 8},
                                   Layout(root / "batched"))
        assert stats["encoded"] == 1, stats

    print(f"images: {args.images} in {len(SIZES)} aspect ratios, resolution {args.resolution}, tiny VAE, CPU, "
          f"{os.cpu_count()} cores")
    print(f"batched by bucket (8, workers): {args.images / batched:7.1f} images/s  ({batched:.1f} s)")
    print(f"batched by bucket, no workers:  {args.images / no_workers:7.1f} images/s  ({no_workers:.1f} s)")
    print(f"one image at a time, no workers: {args.images / single:7.1f} images/s  ({single:.1f} s)")
    print(f"batched / one-at-a-time speed:   {single / batched:.2f}x")
    print(f"re-run after one image changed:  {rerun:.2f} s = {rerun / batched:.3f} of the full batched run")


if __name__ == "__main__":
    main()
