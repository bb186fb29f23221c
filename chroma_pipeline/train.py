"""Run the chain up to the adapter without Dagster, reusing every cache that is still valid.

    python -m chroma_pipeline.train --config my-config.jsonc

Under `accelerate launch` every process runs this; with `--only-train` (what the
`lora_adapter` asset launches) the caches are taken as built and only training runs.
Under Dagster Pipes, rank 0 streams its log into the Dagster run and reports the
materialization (data version, metadata, loss curve) back through Pipes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

import torch

from .config import load_config
from .device import detect_device
from .distributed import process_state
from .errors import run_command
from .image_latents import build_latents
from .layout import Layout
from .lora_adapter import adapter_report, build_adapter
from .models import resolve_model_dir
from .quantized_base import build_quantized, decided_precision
from .raw_dataset import build_manifest
from .report import as_pipes_metadata
from .text_embeddings import build_embeddings


def _quiet(_message: str) -> None:
    """The log of ranks other than 0."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chroma_pipeline.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a JSON/JSONC config file (the quickstart's keys)")
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:N, mps or cpu")
    parser.add_argument("--only-train", action="store_true", help="skip the cache steps (they are built already)")
    args = parser.parse_args(argv)

    config = load_config(args.config)
    layout = Layout(Path(config.output_dir).resolve())
    requested = args.device
    if os.environ.get("WORLD_SIZE", "1") != "1" and requested.split(":")[0] in ("auto", "cuda") and torch.cuda.is_available():
        requested = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"  # one GPU per process, whatever was pinned
    device = detect_device(requested)
    state = process_state(device)
    with contextlib.ExitStack() as stack:
        log, pipes = print, None
        if state.is_main_process and os.environ.get("DAGSTER_PIPES_CONTEXT"):  # only rank 0 talks to Dagster
            from dagster_pipes import open_dagster_pipes

            pipes = stack.enter_context(open_dagster_pipes())
            log = pipes.log.info
        if not state.is_main_process:
            log = _quiet
        log(f"rank {state.process_index}/{state.num_processes}: {device.kind} ({device.name}), "
            f"compute dtype {device.compute_dtype(config.mixed_precision)}")
        if not args.only_train and state.is_main_process:  # the caches are built once; the other ranks wait for them
            manifest, _rows = build_manifest(config, layout)
            log(f"dataset: {manifest.stats['samples']} samples, {manifest.stats['skipped']} skipped")
            for step in (build_latents, build_embeddings, build_quantized):
                step(config, layout, device, log=log)
        state.wait_for_everyone()
        if state.num_processes > 1 and config.base_model_precision == "auto":
            # Every rank trains on the base model quantized_base_model decided on (its record may sit
            # on another machine's disk): rank 0 reads the decision and tells the others.
            from accelerate.utils import broadcast_object_list

            model_dir = resolve_model_dir(config, layout.models_dir)
            chosen = [decided_precision(config, layout, model_dir, device)[0] if state.is_main_process else None]
            config = config.model_copy(update={"base_model_precision": broadcast_object_list(chosen)[0]})
        result = build_adapter(config, layout, device, log=log, progress_bar=log is print)
        if pipes is not None:
            pipes.report_asset_materialization(metadata=as_pipes_metadata(adapter_report(result)),
                                               data_version=result.data_version)
        log(f"adapter: {result.path} ({state.num_processes} processes, samples per rank "
            f"{result.stats.get('samples_per_rank')})")
    if state.num_processes > 1:
        state.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(run_command(main, "python -m chroma_pipeline.train"))
