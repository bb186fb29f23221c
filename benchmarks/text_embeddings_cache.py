"""Edit one caption, pay for one caption: the text-embedding cache on 2,000 captions.

Runs `text_embeddings` through Dagster on the tiny flavour, twice: a cold cache, then after
editing one caption. Prints both wall times and their ratio, and bytes on disk per caption
against storing every padded position.

    python benchmarks/text_embeddings_cache.py [--captions 2000] [--max-length 512]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dagster import DagsterInstance  # noqa: E402
from PIL import Image  # noqa: E402

from assets.definitions import materialize_chain  # noqa: E402
from chroma_pipeline.demo_data import COLOURS, SHAPES, demo_config  # noqa: E402

SCAN = ["raw_dataset/images", "raw_dataset/captions"]


def make_dataset(folder: Path, count: int) -> None:
    rng = random.Random(0)
    folder.mkdir(parents=True)
    colours = list(COLOURS)
    for i in range(count):
        # Distinct pixels per file, so no image is dropped as a duplicate.
        Image.new("RGB", (128, 128), (i % 256, (i // 256) % 256, 7)).save(folder / f"{i:05d}.png")
        words = [rng.choice(colours), rng.choice(SHAPES), "on a", rng.choice(colours), "background"]
        (folder / f"{i:05d}.txt").write_text(f"{' '.join(words)}, sample {i}")


def materialize_embeddings(config: Path, instance) -> tuple[float, dict]:
    started = time.perf_counter()
    result = materialize_chain(str(config), instance, selection=["text_embeddings"], device="cpu")
    seconds = time.perf_counter() - started
    assert result.success
    metadata = result.asset_materializations_for_node("text_embeddings")[0].metadata
    return seconds, {key: value.value for key, value in metadata.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", type=int, default=2000)
    parser.add_argument("--max-length", type=int, default=512)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_dataset(root / "dataset", args.captions)
        values = demo_config(root / "dataset", root / "output")
        values["tokenizer_max_length"] = args.max_length
        config = root / "config.json"
        config.write_text(json.dumps(values))
        instance = DagsterInstance.ephemeral()

        materialize_chain(str(config), instance, selection=SCAN, device="cpu")
        cold, cold_meta = materialize_embeddings(config, instance)

        (root / "dataset" / "00042.txt").write_text("an edited caption, the only change")
        materialize_chain(str(config), instance, selection=SCAN, device="cpu")
        warm, warm_meta = materialize_embeddings(config, instance)

    assert warm_meta["encoded now"] == 1, "editing one caption must encode exactly one text"
    texts = cold_meta["distinct texts"]
    on_disk = cold_meta["MiB on disk"] * 2**20 / texts
    saved = cold_meta["MiB saved by storing only unmasked tokens"] * 2**20 / texts
    print(f"captions: {args.captions}, distinct texts cached: {texts}, tokenizer_max_length {args.max_length}")
    print(f"cold cache:       {cold:7.2f} s  encoded {cold_meta['encoded now']}")
    print(f"one caption edit: {warm:7.2f} s  encoded {warm_meta['encoded now']}, reused {warm_meta['reused from cache']}, "
          f"dropped {warm_meta['dropped from index']}")
    print(f"re-run / cold:    {warm / cold:.3f}")
    print(f"bytes per caption on disk: {on_disk:,.0f} (unpruned {on_disk + saved:,.0f}, {on_disk / (on_disk + saved):.1%})")


if __name__ == "__main__":
    main()
