"""A forced re-run with nothing changed, against the first run, on 2,000 images.

Each measurement is a fresh process on the tiny flavour with the demo's settings: the first run
materializes the cache steps (folder observation, scan, latents, embeddings, base model, their
checks) on a new project; the re-run materializes the same selection again with nothing changed.
Images are squares of `--resolution` px and the config trains at that resolution (the demo's 256 by
default; 64 makes the first run cheapest, so the ratio hardest). Training is
left out on both sides (its own cache is keyed the same way). Runs alternate first, re-run,
first, re-run, ...; the figure is the median with the range. Time is the materialization in
the process (imports excluded; `--with-startup` adds the whole process).

    python benchmarks/noop_rerun.py [--images 2000] [--runs 3] [--resolution 256]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE_STEPS = ["dataset_folder", "raw_dataset/images", "raw_dataset/captions", "image_latents", "text_embeddings",
               "quantized_base_model"]


def make_project(root: Path, images: int, resolution: int = 256) -> Path:
    from PIL import Image

    from chroma_pipeline.demo_data import COLOURS, SHAPES, demo_config

    folder = root / "dataset"
    folder.mkdir(parents=True)
    colours = list(COLOURS)
    for i in range(images):
        Image.new("RGB", (resolution, resolution), (i % 256, (i // 256) % 256, 7)).save(folder / f"{i:05d}.png")
        words = [colours[i % len(colours)], SHAPES[i % len(SHAPES)], "on a", colours[(i // 7) % len(colours)]]
        (folder / f"{i:05d}.txt").write_text(f"{' '.join(words)} background, sample {i}")
    path = root / "config.json"
    path.write_text(json.dumps({**demo_config(folder, root / "output"), "resolution": resolution}))
    return path


def materialize(config: Path) -> dict:
    """In this process: the cache steps once; returns seconds and what each step did."""
    from dagster import AssetKey, DagsterInstance

    from assets.definitions import materialize_chain

    home = config.parent / "dagster"
    home.mkdir(exist_ok=True)
    instance = DagsterInstance.local_temp(str(home))
    started = time.perf_counter()
    result = materialize_chain(str(config), instance, selection=[AssetKey.from_user_string(s) for s in CACHE_STEPS],
                               device="cpu")
    seconds = time.perf_counter() - started
    assert result.success
    done = {}
    for step in ("image_latents", "text_embeddings"):
        metadata = result.asset_materializations_for_node(step)[0].metadata
        done[step] = {k: v.value for k, v in metadata.items() if k in ("encoded now", "reused from cache")}
    return {"seconds": seconds, "done": done}


def child(config: Path, with_startup: bool) -> dict:
    started = time.perf_counter()
    process = subprocess.run([sys.executable, __file__, "--child", str(config)], capture_output=True, text=True,
                             cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    if process.returncode:
        raise SystemExit(process.stderr[-3000:])
    result = json.loads(process.stdout.strip().splitlines()[-1])
    if with_startup:
        result["seconds"] = time.perf_counter() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--with-startup", action="store_true", help="time whole processes, imports included")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(materialize(args.child)))
        return

    sys.path.insert(0, str(REPO))
    first, again = [], []
    load = os.getloadavg()
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="chroma-noop-") as tmp:
            config = make_project(Path(tmp), args.images, args.resolution)
            first.append(child(config, args.with_startup))
            again.append(child(config, args.with_startup))
            assert again[-1]["done"]["image_latents"]["encoded now"] == 0
            assert again[-1]["done"]["text_embeddings"]["encoded now"] == 0
            print(f"run {run + 1}: first {first[-1]['seconds']:.1f} s, re-run {again[-1]['seconds']:.2f} s", flush=True)

    def summary(values: list[float]) -> str:
        return f"{statistics.median(values):.2f} s ({min(values):.2f}–{max(values):.2f})"

    ratios = [b["seconds"] / a["seconds"] for a, b in zip(first, again, strict=True)]
    print(f"{args.images} images of {args.resolution} px, cache steps {', '.join(CACHE_STEPS)}, CPU, fresh process each, "
          f"load average before {load[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    print(f"first run: {summary([r['seconds'] for r in first])}")
    print(f"re-run, nothing changed: {summary([r['seconds'] for r in again])}")
    print(f"re-run / first run: {100 * statistics.median(ratios):.1f}% ({100 * min(ratios):.1f}–{100 * max(ratios):.1f}%), "
          "goal ≤ 3%")


if __name__ == "__main__":
    main()
