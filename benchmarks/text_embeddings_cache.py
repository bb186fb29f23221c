"""Edit one caption, pay for one caption: the text-embedding cache on 2,000 captions.

Runs `text_embeddings` and its checks through Dagster on the tiny flavour, each time in a fresh
process: on a cold cache, then after editing one caption (the scan before each is not timed, nor
are the imports). Runs alternate cold, edit, cold, edit, ... on new projects; prints the median
and range of each, the ratio per pair, and bytes on disk per caption against storing every padded
position.

    python benchmarks/text_embeddings_cache.py [--captions 2000] [--max-length 512] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dagster import DagsterInstance  # noqa: E402
from PIL import Image  # noqa: E402

from assets.definitions import materialize_chain  # noqa: E402
from chroma_pipeline.demo_data import COLOURS, SHAPES, demo_config  # noqa: E402

SCAN = ["raw_dataset/images", "raw_dataset/captions"]
T5_IMPORT = ("import time, torch; started = time.perf_counter(); from transformers import T5EncoderModel, "
             "T5TokenizerFast; print(time.perf_counter() - started)")


def make_dataset(folder: Path, count: int) -> None:
    rng = random.Random(0)
    folder.mkdir(parents=True)
    colours = list(COLOURS)
    for i in range(count):
        # Distinct pixels per file, so no image is dropped as a duplicate.
        Image.new("RGB", (128, 128), (i % 256, (i // 256) % 256, 7)).save(folder / f"{i:05d}.png")
        words = [rng.choice(colours), rng.choice(SHAPES), "on a", rng.choice(colours), "background"]
        (folder / f"{i:05d}.txt").write_text(f"{' '.join(words)}, sample {i}")


def materialize_embeddings(config: Path) -> dict:
    """In this process: the scan (not timed), then `text_embeddings` with its checks (timed)."""
    instance = DagsterInstance.local_temp(str(config.parent / "dagster"))
    assert materialize_chain(str(config), instance, selection=SCAN, device="cpu").success
    started = time.perf_counter()
    result = materialize_chain(str(config), instance, selection=["text_embeddings"], device="cpu")
    seconds = time.perf_counter() - started
    assert result.success
    metadata = result.asset_materializations_for_node("text_embeddings")[0].metadata
    return {"seconds": seconds, **{key: value.value for key, value in metadata.items()
                                   if isinstance(value.value, (int, float, str))}}


def child(config: Path) -> dict:
    process = subprocess.run([sys.executable, __file__, "--child", str(config)], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    if process.returncode:
        raise SystemExit(process.stderr[-3000:])
    return json.loads(process.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", type=int, default=2000)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(materialize_embeddings(args.child)))
        return

    load = os.getloadavg()
    cold, edit = [], []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            make_dataset(root / "dataset", args.captions)
            values = demo_config(root / "dataset", root / "output")
            values["tokenizer_max_length"] = args.max_length
            config = root / "config.json"
            config.write_text(json.dumps(values))
            (root / "dagster").mkdir()
            cold.append(child(config))
            (root / "dataset" / "00042.txt").write_text("an edited caption, the only change")
            edit.append(child(config))
        assert edit[-1]["encoded now"] == 1, "editing one caption must encode exactly one text"
        print(f"run {run + 1}: cold {cold[-1]['seconds']:.2f} s, one caption edit {edit[-1]['seconds']:.2f} s", flush=True)

    def summary(values: list[float], unit: str = " s", scale: float = 1.0) -> str:
        values = [v * scale for v in values]
        return f"{statistics.median(values):.2f}{unit} ({min(values):.2f}–{max(values):.2f})"

    # What every process that encodes pays before its first text, whatever the project does: importing
    # transformers' T5 (torch already imported, as in the step), in fresh processes.
    imports = [float(subprocess.run([sys.executable, "-c", T5_IMPORT], capture_output=True, text=True, check=True)
                     .stdout.strip()) for _ in range(args.runs)]
    texts = cold[0]["distinct texts"]
    on_disk = cold[0]["MiB on disk"] * 2**20 / texts
    saved = cold[0]["MiB saved by storing only unmasked tokens"] * 2**20 / texts
    ratios = [e["seconds"] / c["seconds"] for c, e in zip(cold, edit, strict=True)]
    print(f"captions: {args.captions}, distinct texts cached: {texts}, tokenizer_max_length {args.max_length}, "
          f"{args.runs} runs each, fresh process each, CPU ({os.cpu_count()} cores), load average before "
          f"{load[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    print(f"bytes per caption on disk: {on_disk:,.0f} (unpruned {on_disk + saved:,.0f}, {on_disk / (on_disk + saved):.1%})")
    print(f"cold cache:       {summary([c['seconds'] for c in cold])}, encoded {cold[0]['encoded now']}")
    print(f"one caption edit: {summary([e['seconds'] for e in edit])}, encoded {edit[0]['encoded now']}, "
          f"reused {edit[0]['reused from cache']}, dropped {edit[0]['dropped from index']}")
    import_seconds = statistics.median(imports)
    without = [(e["seconds"] - import_seconds) / c["seconds"] for c, e in zip(cold, edit, strict=True)]
    print(f"of which importing transformers' T5 (fresh processes): {summary(imports)}; the edit without it: "
          f"{summary([e['seconds'] - import_seconds for e in edit])}, {summary(without, '%', 100)} of cold")
    print(f"one caption edit / cold: {summary(ratios, '%', 100)}, goal ≤ 2%")


if __name__ == "__main__":
    main()
