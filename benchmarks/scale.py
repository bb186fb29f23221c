"""Scale: time and memory of the scan, the indexes, the bucket sampler and the Dagster metadata at 1k-100k images.

Generates one folder of N small PNGs with captions per size (64 px squares and 128x64 /
64x128 strips, three buckets at `resolution: 64, resolution_type: pixel`; 2% have no
caption and 1% are byte-identical copies, so the skip and duplicate tables have rows).
Only the pixels are cheap: a few random pictures, each file made distinct by a PNG text
chunk carrying its number, so every file has its own hash and is a sample of its own.
Every measurement runs the pipeline's own code in a fresh process:

  scan            chroma_pipeline.raw_dataset.build_manifest
  manifest read   chroma_pipeline.dataset.read_manifest + usable
  sampler         chroma_pipeline.batches.bucket_batches (what training.train_lora draws from), one epoch
  dagster scan    the dataset_scan job's assets (dataset_folder observed, raw_dataset/images and /captions)
                  through Dagster on a SQLite instance: metadata bytes per asset, event-log bytes
  latents         chroma_pipeline.image_latents.build_latents with the tiny VAE: first run (all encoded), re-run
  embeddings      chroma_pipeline.text_embeddings.build_embeddings with the tiny T5: first run, re-run
  indexes read    latent and embedding indexes, and lora_adapter.training_samples pairing them
  training        chroma_pipeline.lora_adapter.build_adapter, 4 steps, and the metadata the asset attaches
  dagster caches  image_latents and text_embeddings (cached) with their checks through Dagster

The model steps (latents, embeddings, indexes read, training, dagster caches) run at sizes up to
--model-steps-up-to (default 10000): on the shared 2-core machine the tiny VAE's first run over
10k images took 1-4 minutes (the DataLoader decode worker, the shard commits and other tenants
share the cores), so 100k would take 15-40 minutes. Their 100k column is extrapolated from the 1k -> 10k growth, and
says so. The sampler's input is built from the manifest with the pipeline's bucket function
(a model step is not needed for it); at sizes with real indexes it is checked equal to what
training pairs from them.

Peak RSS is the high-water mark of the measured call alone (reset just before it through
/proc/self/clear_refs), so it includes Python, torch and the pipeline imported; "above start"
subtracts the RSS just before the call, i.e. what the step itself holds (first-use costs such
as pyarrow's memory pool or a model's weights included). The VAE's decode worker is a process
of its own; its peak is shown apart. The goal: time linear in N, peak RSS flat (<= 1.2x from
1k to 100k) except for what is the index itself.

    python benchmarks/scale.py [--sizes 1000,10000,100000] [--runs 3] [--work DIR]
    python benchmarks/scale.py --sizes 300,3000 --runs 1      # a quick check, a few minutes
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20

SHAPES = [(64, 64), (128, 64), (64, 128)]  # three buckets at resolution 64 (pixel): 64x64, 128x64, 64x128
DISTINCT_PICTURES = 24  # per shape; each file still gets bytes of its own
NO_CAPTION_EVERY = 50  # 2% of the images have no caption (skipped: "no caption")
DUPLICATE_EVERY = 100  # 1% are byte-identical copies of another image (skipped: "duplicate")
TRAIN_STEPS = 4

TIER_A = ("scan", "manifest_read", "sampler", "dagster_scan")
TIER_B = ("latents", "embeddings", "latents_rerun", "embeddings_rerun", "indexes_read", "training", "dagster_caches")


# ---------------------------------------------------------------- the dataset (only the pixels are cheap)

def _png_with_text(png: bytes, text: str) -> bytes:
    """The same PNG with a tEXt chunk after IHDR: same pixels, bytes (and so hash) of its own."""
    data = b"Comment\x00" + text.encode()
    chunk = struct.pack(">I", len(data)) + b"tEXt" + data + struct.pack(">I", zlib.crc32(b"tEXt" + data))
    return png[:33] + chunk + png[33:]  # 8-byte signature + 25-byte IHDR chunk


def _pictures() -> dict[tuple[int, int], list[bytes]]:
    import io

    from PIL import Image, ImageDraw

    rng = random.Random(0)
    pictures = {}
    for shape in SHAPES:
        pictures[shape] = []
        for _ in range(DISTINCT_PICTURES):
            image = Image.new("RGB", shape, tuple(rng.randrange(256) for _ in range(3)))
            draw = ImageDraw.Draw(image)
            for _ in range(3):
                x, y = rng.randrange(shape[0]), rng.randrange(shape[1])
                draw.rectangle((x, y, x + rng.randrange(8, 40), y + rng.randrange(8, 40)),
                               fill=tuple(rng.randrange(256) for _ in range(3)))
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            pictures[shape].append(buffer.getvalue())
    return pictures


COLOURS = "red green blue yellow orange purple pink black white grey brown gold silver".split()
THINGS = "circle square triangle line stripe ring star cloud tree flower house cat dog bird".split()


def make_dataset(folder: Path, count: int) -> None:
    """`count` images with captions; every NO_CAPTION_EVERY-th has none, every DUPLICATE_EVERY-th copies another."""
    pictures = _pictures()
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for i in range(count):
        name = f"{i:06d}"
        if i % DUPLICATE_EVERY == DUPLICATE_EVERY - 1:  # a copy of the image before it (kept: first by name)
            (staging / f"{name}.png").write_bytes((staging / f"{i - 1:06d}.png").read_bytes())
        else:
            shape = SHAPES[i % len(SHAPES)]
            (staging / f"{name}.png").write_bytes(_png_with_text(pictures[shape][i % DISTINCT_PICTURES], name))
        if i % NO_CAPTION_EVERY != NO_CAPTION_EVERY // 2:  # (never a duplicate's original)
            caption = (f"a {COLOURS[i % 13]} {THINGS[i % 14]} beside a {COLOURS[i // 13 % 13]} "
                       f"{THINGS[i // 14 % 14]}, photo {i}")
            (staging / f"{name}.txt").write_text(caption)
    staging.rename(folder)


def write_config(work: Path, size: int) -> Path:
    path = work / f"config-{size}.json"
    path.write_text(json.dumps({
        "model_flavour": "tiny", "instance_data_dir": str(work / f"dataset-{size}"), "output_dir": str(work / f"out-{size}"),
        "resolution": 64, "resolution_type": "pixel", "tokenizer_max_length": 32, "max_train_steps": TRAIN_STEPS,
        "validation_steps": 0, "checkpointing_steps": 10_000,
    }, indent=2))
    return path


# ---------------------------------------------------------------- measurements (each in a fresh child process)

def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _reset_peak() -> bool:
    """Start the process's RSS high-water mark afresh (Linux), so a peak is the measured call's own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # since the last _reset_peak


def _children_peak() -> int:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


# Anonymous and file-backed RSS, sampled from outside: a sampling thread inside the measured process
# made it wait for the GIL on this busy 2-core machine (its steps ran up to 2.5x slower).
_SAMPLER = """
import select, sys
pid, peaks = sys.argv[1], {"RssAnon:": 0, "RssFile:": 0}
print("ready", flush=True)
stopped = False
while not stopped:  # one sample at least, however short the call
    stopped = bool(select.select([sys.stdin], [], [], 0.05)[0])
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                key = line.split()[0] if line.strip() else ""
                if key in peaks:
                    peaks[key] = max(peaks[key], int(line.split()[1]) * 1024)
    except OSError:
        break
print(peaks["RssAnon:"], peaks["RssFile:"], flush=True)
"""


def _measured(call):
    """(value, {seconds, start_rss, peak_rss, peak_anon, peak_file}) of `call()`, RSS in bytes. The peak is
    the call's own where the high-water mark can be reset (Linux), else the process's since it started;
    anonymous and file-backed RSS are sampled every 50 ms by another process (their peaks to within that)."""
    sampler = None
    if Path("/proc/self/status").is_file():
        sampler = subprocess.Popen([sys.executable, "-c", _SAMPLER, str(os.getpid())], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True)
        sampler.stdout.readline()
    _reset_peak()
    start = _rss()
    started = time.perf_counter()
    value = call()
    seconds = time.perf_counter() - started
    peak = _peak()
    anon = file = 0
    if sampler is not None:
        anon, file = (int(v) for v in sampler.communicate("stop\n")[0].split())
    return value, {"seconds": seconds, "start_rss": start, "peak_rss": peak, "peak_anon": anon, "peak_file": file}


def _in_memory(value) -> int:
    """Bytes of Python objects `value` holds (rows, lists of rows, dataclasses of str/int), each object once."""
    seen: set[int] = set()
    total, todo = 0, [value]
    while todo:
        item = todo.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        total += sys.getsizeof(item)
        if isinstance(item, (list, tuple)):
            todo.extend(item)
        elif isinstance(item, dict):
            todo.extend(item.values())
        elif hasattr(item, "__dict__"):
            todo.extend(vars(item).values())
            total += sys.getsizeof(vars(item))
    return total


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def _dagster_bytes(value) -> int:
    from dagster import serialize_value

    return len(serialize_value(value).encode())


def _samples_from_manifest(config, layout):
    """What train_lora's sampler is given: one sample per usable image, in its bucket, sorted by path
    (as lora_adapter.training_samples sorts them). The bucket comes from the pipeline's own settings."""
    from chroma_pipeline.batches import TrainingSample
    from chroma_pipeline.buckets import bucket_for
    from chroma_pipeline.dataset import read_manifest, usable
    from chroma_pipeline.image_latents import dataset_bucketing
    from chroma_pipeline.latents import LatentEntry

    bucketing = dataset_bucketing(config)
    samples = []
    for row in usable(read_manifest(layout.manifest)):
        b = bucketing[row.dataset]
        width, height = bucket_for(row.width, row.height, b.resolution, b.resolution_type, b.framing.crop_aspect)
        samples.append(TrainingSample(LatentEntry(row.path, row.image_sha256, width, height, ""), "", row.dataset))
    return sorted(samples, key=lambda sample: sample.latent.path)


def _dagster_run(config_path: Path, selection) -> dict:
    """Materialize `selection` through Dagster on a SQLite instance; the metadata each asset and check recorded."""
    from dagster import DagsterInstance

    from assets.definitions import materialize_chain

    with tempfile.TemporaryDirectory(prefix="scale-dagster-") as home:
        instance = DagsterInstance.local_temp(home)
        result, stats = _measured(lambda: materialize_chain(str(config_path), instance, selection=selection, device="cpu"))
        assert result.success
        metadata = {}
        for event in result.get_asset_materialization_events():
            materialization = event.step_materialization_data.materialization
            metadata[materialization.asset_key.to_user_string()] = _dagster_bytes(materialization.metadata)
        for event in result.get_asset_observation_events():
            observation = event.asset_observation_data.asset_observation
            metadata[observation.asset_key.to_user_string() + " (observation)"] = _dagster_bytes(observation.metadata)
        for evaluation in result.get_asset_check_evaluations():
            metadata[f"check {evaluation.check_name}"] = _dagster_bytes(evaluation.metadata)
        logs = instance.all_logs(result.run_id)
        stats.update(metadata_bytes=metadata, events=len(logs), event_log_bytes=sum(_dagster_bytes(e) for e in logs),
                     log_messages=sum(1 for e in logs if not e.is_dagster_event))
        instance.dispose()
    return stats


def child(measure: str, config_path: Path, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from chroma_pipeline.config import load_config
    from chroma_pipeline.device import detect_device
    from chroma_pipeline.layout import Layout

    config = load_config(config_path)
    layout = Layout(Path(config.output_dir))
    device = detect_device("cpu")
    quiet = lambda _message: None  # noqa: E731

    if measure == "scan":
        from chroma_pipeline.raw_dataset import build_manifest

        (result, rows), stats = _measured(lambda: build_manifest(config, layout))
        return {**stats, "rows": len(rows), "samples": result.stats["samples"], "manifest_bytes": _size(layout.manifest),
                "index_in_memory": _in_memory(rows)}

    if measure == "manifest_read":
        from chroma_pipeline.dataset import read_manifest, usable

        rows, stats = _measured(lambda: usable(read_manifest(layout.manifest)))
        return {**stats, "samples": len(rows), "manifest_bytes": _size(layout.manifest), "index_in_memory": _in_memory(rows)}

    if measure == "sampler":
        from chroma_pipeline.batches import bucket_batches, dataset_probability, dataset_repeats

        samples = _samples_from_manifest(config, layout)
        checked = False
        if layout.latent_index.is_file() and layout.embedding_index.is_file():
            from chroma_pipeline.lora_adapter import training_samples

            paired, _ = training_samples(layout)
            assert [(s.latent.path, s.bucket) for s in paired] == [(s.latent.path, s.bucket) for s in samples]
            checked = True
            del paired
        per_bucket: dict = {}
        for sample in samples:
            per_bucket[sample.bucket] = per_bucket.get(sample.bucket, 0) + 1
        epoch = sum(math.ceil(n / config.train_batch_size) for n in per_bucket.values())

        def one_epoch():
            batches = bucket_batches(samples, config.train_batch_size, config.seed, dataset_repeats(config),
                                     dataset_probability(config, samples))
            return sum(len(next(batches)) for _ in range(epoch))

        drawn, stats = _measured(one_epoch)
        assert drawn == len(samples)
        # RSS hardly sees the sampler (it reuses memory the manifest read freed): count its Python objects.
        import tracemalloc

        tracemalloc.start()
        one_epoch()
        heap_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return {**stats, "samples": len(samples), "batches": epoch, "checked_against_indexes": checked,
                "heap_peak": heap_peak, "samples_in_memory": _in_memory(samples)}

    if measure == "dagster_scan":
        return _dagster_run(config_path, ["dataset_folder", "raw_dataset/images", "raw_dataset/captions"])

    if measure in ("latents", "latents_rerun"):
        from chroma_pipeline.image_latents import build_latents

        result, stats = _measured(lambda: build_latents(config, layout, device, log=quiet))
        shards = layout.latent_dir / "shards.parquet"
        return {**stats, "children_peak_rss": _children_peak(), "encoded": result.stats["encoded"],
                "latent_index_bytes": _size(layout.latent_index), "shard_map_bytes": _size(shards),
                "shard_bytes": sum(p.stat().st_size for p in layout.latent_dir.glob("*.safetensors"))}

    if measure in ("embeddings", "embeddings_rerun"):
        from chroma_pipeline.text_embeddings import build_embeddings

        result, stats = _measured(lambda: build_embeddings(config, layout, device, log=quiet, warn=quiet))
        return {**stats, "encoded": result.stats["encoded"], "over_long": len(result.stats["over_long"]),
                "embedding_index_bytes": _size(layout.embedding_index), "embedding_bytes": result.stats["bytes_on_disk"]}

    if measure == "indexes_read":
        from chroma_pipeline.latents import read_latent_index
        from chroma_pipeline.lora_adapter import training_samples
        from chroma_pipeline.text import read_embedding_index

        def read_all():
            return read_latent_index(layout.latent_index), read_embedding_index(layout.embedding_index), \
                training_samples(layout)[0]

        (latents, texts, samples), stats = _measured(read_all)
        return {**stats, "latent_entries": len(latents), "embedding_entries": len(texts), "samples": len(samples),
                "index_in_memory": _in_memory((latents, texts, samples))}

    if measure == "training":
        from chroma_pipeline.lora_adapter import adapter_report, build_adapter

        result, stats = _measured(lambda: build_adapter(config, layout, device, log=quiet))
        assert not result.stats["reused"] and result.stats["steps"] == TRAIN_STEPS
        from assets._metadata import as_dagster_metadata

        return {**stats, "metadata_bytes": {"lora_adapter": _dagster_bytes(as_dagster_metadata(adapter_report(result)))}}

    if measure == "dagster_caches":
        return _dagster_run(config_path, ["image_latents", "text_embeddings"])

    if measure == "prepare_base":  # the quantized base model training loads (not measured: it does not grow with N)
        from chroma_pipeline.quantized_base import build_quantized

        build_quantized(config, layout, device, log=quiet)
        return {}
    raise SystemExit(f"unknown measure {measure}")


# ---------------------------------------------------------------- the parent: runs, tables, growth

def _reset(measure: str, output: Path) -> None:
    """What each measurement must not find, so every run does the same work."""
    dataset = output / "dataset"
    cache = output / "cache"
    if measure == "dagster_scan":  # a first observation: every file hashed, as a new dataset is
        for name in ("file_hashes.json", "observed_files.json"):
            (dataset / name).unlink(missing_ok=True)
    elif measure == "latents":
        shutil.rmtree(cache / "latents", ignore_errors=True)
        (cache / "latents_index.parquet").unlink(missing_ok=True)
    elif measure == "embeddings":
        shutil.rmtree(cache / "text_embeddings", ignore_errors=True)
        (cache / "text_embeddings_index.parquet").unlink(missing_ok=True)
    elif measure == "training":
        shutil.rmtree(output / "lora", ignore_errors=True)
        shutil.rmtree(output / "checkpoints", ignore_errors=True)


def run_child(measure: str, config_path: Path, output: Path, log: Path, threads: int = 1) -> dict:
    _reset(measure, output)
    load_before = os.getloadavg()[0]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    with open(log, "a") as stderr:
        child_process = subprocess.run([sys.executable, __file__, "--child", measure, "--config", str(config_path),
                                        "--threads", str(threads)],
                                       stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, cwd=ROOT)
    if child_process.returncode:
        raise SystemExit(f"{measure} at {config_path.name} failed; its stderr is in {log}")
    result = json.loads(child_process.stdout.strip().splitlines()[-1])
    result.update(load_before=load_before, load_after=os.getloadavg()[0])
    return result


def _spread(values: list[float], fmt: str = "{:.3g}") -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def _median(runs: list[dict], key) -> float | None:
    values = [key(run) for run in runs]
    return statistics.median(values) if values else None


LABELS = {
    "scan": "scan (build_manifest)", "manifest_read": "manifest read", "sampler": "sampler, 1 epoch",
    "dagster_scan": "dagster: observe + scan", "latents": "latents, first run", "latents_rerun": "latents, re-run",
    "embeddings": "embeddings, first run", "embeddings_rerun": "embeddings, re-run",
    "indexes_read": "indexes read + pairing", "training": f"training, {TRAIN_STEPS} steps",
    "dagster_caches": "dagster: latents + embeddings + checks",
}


def report(results: dict, sizes: list[int]) -> str:
    lines = []
    measures = [m for m in (*TIER_A, *TIER_B) if any(results[s].get(m) for s in sizes)]
    header = "| measurement | " + " | ".join(f"{s:,}" for s in sizes) + " |"
    rule = "|---|" + "---|" * len(sizes)

    def runs_of(size, measure):
        return results[size].get(measure, [])

    def row(label, cells):
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    def table(title, cell, which=measures, missing="not run"):
        lines.extend(["", title, "", header, rule])
        for m in which:
            row(LABELS[m], [cell(runs_of(s, m)) if runs_of(s, m) else missing(s, m) if callable(missing) else missing
                            for s in sizes])

    def mib(key, fmt="{:.0f}"):
        return lambda runs: _spread([key(r) / MIB for r in runs], fmt)

    table("Seconds: median (min-max) [runs]", lambda runs: f"{_spread([r['seconds'] for r in runs])} [{len(runs)}]",
          missing=lambda s, m: _extrapolated(results, sizes, s, m, "seconds"))
    table("Peak RSS MiB during the step: median (min-max)", mib(lambda r: r["peak_rss"]))
    table("Peak anonymous RSS MiB (heap; RSS less the pages of mapped files such as the latent shards)",
          mib(lambda r: r["peak_anon"]))
    row("latents, first run: the VAE's decode worker (a process of its own)",
        [mib(lambda r: r["children_peak_rss"])(runs_of(s, "latents")) if runs_of(s, "latents") else "not run"
         for s in sizes])
    table("Peak RSS above the RSS at the start of the step, MiB (what the step itself holds)",
          mib(lambda r: r["peak_rss"] - r["start_rss"], "{:.1f}"))
    holding = [m for m in measures if any("index_in_memory" in r for s in sizes for r in runs_of(s, m))]
    table("... of which the index the step returns, in memory (Python objects), MiB",
          mib(lambda r: r["index_in_memory"], "{:.1f}"), holding)
    table("... and the rest (above start, less the index), MiB",
          mib(lambda r: r["peak_rss"] - r["start_rss"] - r["index_in_memory"], "{:.1f}"), holding)
    if any(runs_of(s, "sampler") for s in sizes):
        lines.extend(["", "Sampler: Python objects (tracemalloc), MiB", "", header, rule])
        row("its input, one sample per image", [mib(lambda r: r["samples_in_memory"], "{:.2f}")(runs_of(s, "sampler"))
                                                if runs_of(s, "sampler") else "not run" for s in sizes])
        row("its peak while drawing one epoch", [mib(lambda r: r["heap_peak"], "{:.2f}")(runs_of(s, "sampler"))
                                                 if runs_of(s, "sampler") else "not run" for s in sizes])
    table("Load average (1 min) before each run: min-max",
          lambda runs: f"{min(r['load_before'] for r in runs):.1f}-{max(r['load_before'] for r in runs):.1f}", missing="-")

    lines.extend(["", "Indexes on disk, KiB", "", header, rule])
    for label, measure, key in (("manifest.parquet", "scan", "manifest_bytes"),
                                ("latents_index.parquet", "latents", "latent_index_bytes"),
                                ("latents/shards.parquet (entry -> shard)", "latents", "shard_map_bytes"),
                                ("latent shards (safetensors)", "latents", "shard_bytes"),
                                ("text_embeddings_index.parquet", "embeddings", "embedding_index_bytes"),
                                ("embedding files", "embeddings", "embedding_bytes")):
        row(label, [f"{_median(runs_of(s, measure), lambda r, key=key: r[key]) / 1024:,.0f}" if runs_of(s, measure)
                    else "not run" for s in sizes])

    dagster = ("dagster_scan", "dagster_caches", "training")
    lines.extend(["", "Dagster: serialized metadata bytes per asset / check, and the run's event log", "", header, rule])
    names = []
    for s in sizes:
        for run in (run for m in dagster for run in runs_of(s, m)):
            names += [n for n in run["metadata_bytes"] if n not in names]
    for name in names:
        values = {s: [run["metadata_bytes"][name] for m in dagster for run in runs_of(s, m) if name in run["metadata_bytes"]]
                  for s in sizes}
        row(name, [f"{statistics.median(values[s]):,.0f}" if values[s] else "not run" for s in sizes])
    for measure in dagster[:2]:
        for label, key in (("events", "events"), ("log messages", "log_messages"), ("event log KiB", "event_log_bytes")):
            cells = []
            for s in sizes:
                value = _median(runs_of(s, measure), lambda r, key=key: r[key])
                cells.append("not run" if value is None else f"{value / 1024:,.0f}" if key.endswith("bytes") else f"{value:,.0f}")
            row(f"{LABELS[measure]}: {label}", cells)

    steps = list(zip(sizes, sizes[1:], strict=False))
    lines.extend(["", "Growth per 10x, median over median: seconds ratio (linear = 10) / peak RSS ratio / peak anonymous "
                  f"RSS ratio; and peak RSS {sizes[0]:,} -> {sizes[-1]:,}: whole, anonymous, less the index (goal <= 1.2x)",
                  ""])
    lines.append("| measurement | " + " | ".join(f"{a:,} -> {b:,}" for a, b in steps)
                 + f" | peak RSS {sizes[0]:,} -> {sizes[-1]:,} | anonymous | less the index |")
    lines.append("|---|" + "---|" * (len(steps) + 3))

    def ratio(later, earlier, key):
        return _median(later, key) / max(_median(earlier, key), 1e-9)

    for m in measures:
        cells = []
        for a, b in steps:
            ra, rb = runs_of(a, m), runs_of(b, m)
            cells.append(f"{ratio(rb, ra, lambda r: r['seconds']) * 10 * a / b:.1f} / "  # per 10x
                         f"{ratio(rb, ra, lambda r: r['peak_rss']):.2f} / {ratio(rb, ra, lambda r: r['peak_anon']):.2f}"
                         if ra and rb else "not run")
        first, last = runs_of(sizes[0], m), runs_of(sizes[-1], m)
        overall = ["not run"] * 3
        if first and last:
            overall = [f"{ratio(last, first, lambda r: r['peak_rss']):.2f}",
                       f"{ratio(last, first, lambda r: r['peak_anon']):.2f}",
                       f"{ratio(last, first, lambda r: r['peak_rss'] - r['index_in_memory']):.2f}" if m in holding else "-"]
        row(LABELS[m], [*cells, *overall])
    return "\n".join(lines)


def _extrapolated(results: dict, sizes: list[int], size: int, measure: str, key: str) -> str:
    """A size the step did not run at: the largest measured size scaled linearly, labelled as such."""
    measured = [s for s in sizes if results[s].get(measure)]
    if not measured or measure in TIER_A:
        return "not run"
    base = max(measured)
    value = _median(results[base][measure], lambda r: r[key]) * size / base
    return f"~{value:.0f} (extrapolated {size // base}x {base:,}, not run)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--runs", type=int, default=3, help="fresh-process runs per measurement at sizes up to --repeat-up-to")
    parser.add_argument("--repeat-up-to", type=int, default=10_000, help="larger sizes get one run of each")
    parser.add_argument("--model-steps-up-to", type=int, default=10_000,
                        help="largest size at which the VAE / T5 / training steps run (100k: ~30 min of tiny VAE here)")
    parser.add_argument("--first-runs-up-to", type=int, default=1_000,
                        help="sizes above this encode (first run of latents and embeddings) once, not --runs times")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process (default 1: on the shared 2-core machine 2 threads made the "
                             "tiny VAE ~190x slower whenever another tenant held a core)")
    parser.add_argument("--work", type=Path, help="keep datasets and outputs here (reused by the next run)")
    parser.add_argument("--json", type=Path, help="also write every run's figures here")
    parser.add_argument("--from-json", type=Path, help="print the tables of an earlier run's figures, run nothing")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(child(args.child, args.config, args.threads)))
        return

    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        print(report({int(s): r for s, r in saved.items()}, sorted(int(s) for s in saved)))
        return
    sizes = sorted(int(s) for s in args.sizes.split(","))
    work = args.work or Path(tempfile.mkdtemp(prefix="chroma-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "children.log"
    started = time.perf_counter()
    print(f"{os.cpu_count()} CPUs, {args.threads} torch thread(s) per process, load average at start "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}; work folder {work}; child stderr in {log}", flush=True)
    results: dict[int, dict[str, list[dict]]] = {}
    for size in sizes:
        results[size] = {}
        folder = work / f"dataset-{size}"
        if not folder.is_dir():
            t = time.perf_counter()
            make_dataset(folder, size)
            print(f"{size:,} images generated in {time.perf_counter() - t:.1f}s", flush=True)
        config_path = write_config(work, size)
        output = work / f"out-{size}"
        runs = args.runs if size <= args.repeat_up_to else 1
        plan = [m for _ in range(runs) for m in TIER_A]  # alternating, so a busy spell of the machine hits them all
        if size <= args.model_steps_up_to:
            run_child("prepare_base", config_path, output, log, args.threads)
            first_runs = runs if size <= args.first_runs_up_to else 1
            plan += [m for _ in range(first_runs) for m in ("latents", "embeddings")]
            plan += [m for _ in range(runs) for m in TIER_B[2:]]
        for measure in plan:
            result = run_child(measure, config_path, output, log, args.threads)
            results[size].setdefault(measure, []).append(result)
            print(f"  {size:>7,} {measure:<17} {result['seconds']:7.2f}s  peak {result['peak_rss'] / MIB:6.0f} MiB  "
                  f"(+{(result['peak_rss'] - result['start_rss']) / MIB:5.1f})  load {result['load_before']:.1f}", flush=True)
    figures = json.dumps({str(s): r for s, r in results.items()}, indent=1)
    for target in filter(None, (args.json, args.work and work / "results.json")):
        target.write_text(figures)
    print(f"\ntotal {time.perf_counter() - started:.0f}s; load average at end "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(report(results, sizes))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
