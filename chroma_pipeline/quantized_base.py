"""Step `quantized_base_model`: the Chroma transformer at `base_model_precision`, quantized once and reloaded.

Also the one place that decides which precision a run uses (`decide_precision`; the later
steps read that decision with `decided_precision`) and where
that model lives on disk (`quantized_key`), so training, the grid and the checks load
exactly the model this step saved and never quantize again.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import models
from . import quantize as quantization
from .config import ChromaConfig
from .dataset import read_manifest, usable
from .device import DeviceInfo
from .layout import Layout, StepResult
from .lora import target_modules
from .memory import AUTO_ORDER, Estimate, PeakRSS, check_fits, choose_precision, estimate, host_available
from .storage import combine_hashes, write_json_atomic

SETTINGS = ("output_dir", *models.MODEL_SETTINGS, "base_model_precision", "base_model_keep_full_precision")


def precision_estimates(config: ChromaConfig, model_dir: Path, device: DeviceInfo,
                        layout: Layout | None = None) -> dict[str, Estimate]:
    """Training and quantizing memory at every precision `auto` may pick, and the configured one."""
    transformer_config = json.loads((model_dir / "transformer" / "config.json").read_text())
    return estimates_for(config, transformer_config, device, layout)


def largest_training_bucket(config: ChromaConfig, layout: Layout | None = None) -> tuple[int, int]:
    """The bucket with the most pixels training will see, over every dataset: from the scanned images
    of each dataset the manifest has rows for, else that dataset's square bucket (before its scan;
    training checks the fit again with the real buckets)."""
    scanned: dict[str, list] = {}
    if layout is not None and layout.manifest.is_file():
        for row in usable(read_manifest(layout.manifest)):
            scanned.setdefault(row.dataset, []).append(row)
    buckets = []
    for dataset in config.image_datasets:
        rows = scanned.get(dataset.id)
        buckets += [dataset.bucket(row.width, row.height, config) for row in rows] if rows else [
            dataset.bucket(1000, 1000, config)]
    return max(buckets, key=lambda size: size[0] * size[1])


def estimates_for(config: ChromaConfig, transformer_config: dict, device: DeviceInfo,
                  layout: Layout | None = None) -> dict[str, Estimate]:
    """`precision_estimates` from a transformer config alone: no model on disk needed (`configure` uses it)."""
    kept_bytes = torch.finfo(device.compute_dtype(config.mixed_precision)).bits // 8
    candidates = {*AUTO_ORDER, config.base_model_precision} - {"auto"}
    return {
        precision: estimate(
            transformer_config, precision, keep=tuple(config.base_model_keep_full_precision), rank=config.network_rank,
            lora_pattern=target_modules(config.flux_lora_target, transformer_config["num_single_layers"]),
            bucket=largest_training_bucket(config, layout), batch_size=config.train_batch_size,
            text_tokens=config.tokenizer_max_length, gradient_checkpointing=config.gradient_checkpointing,
            bytes_per_kept=kept_bytes,
        )
        for precision in candidates
    }


def decide_precision(config: ChromaConfig, layout: Layout, model_dir: Path, device: DeviceInfo,
                     recheck: bool = True) -> tuple[str, str]:
    """The precision this run's base model has, and why; for `auto`, the decision and its record.

    `auto` is decided when `quantized_base_model` runs (`recheck`: a remembered choice is kept
    while it still fits the free memory now, so a re-run reuses the same quantized model) and
    remembered per transformer, device, dtype and kept layers: what names the quantized model.
    Training, the grid and the checks read that record (`decided_precision`) and never re-check
    memory, which after training is not what the decision was made on; if a training setting
    changed so much that the model no longer fits, training's own fit check says so. Only when
    nothing was recorded yet (a run that skipped quantized_base_model) do they decide here.
    """
    requested = config.base_model_precision
    if requested != "auto":
        return requested, f"base_model_precision is {requested!r}"
    memo_key, remembered = _auto_memo(config, layout, model_dir, device)
    if memo_key in remembered and not recheck:
        precision, reason = remembered[memo_key]
        return precision, reason
    estimates = precision_estimates(config, model_dir, device, layout)
    free = device.free_memory_bytes()
    if memo_key in remembered:
        precision, reason = remembered[memo_key]
        if estimates[precision].training_device <= free:
            return precision, reason + " (remembered)"
    precision, reason = choose_precision("auto", estimates, device.kind, free)
    write_json_atomic(_memo_path(layout), {**remembered, memo_key: [precision, reason]})
    return precision, reason


def decided_precision(config: ChromaConfig, layout: Layout, model_dir: Path, device: DeviceInfo) -> tuple[str, str]:
    """The precision quantized_base_model decided on: what training, the grid and the checks load."""
    return decide_precision(config, layout, model_dir, device, recheck=False)


def _memo_path(layout: Layout) -> Path:
    return layout.models_dir / "auto_precision.json"


def _auto_memo(config: ChromaConfig, layout: Layout, model_dir: Path, device: DeviceInfo) -> tuple[str, dict]:
    memo_key = combine_hashes("auto", models.component_identity(model_dir, "transformer"), device.name,
                              str(device.compute_dtype(config.mixed_precision)),
                              ",".join(config.base_model_keep_full_precision))
    memo = _memo_path(layout)
    return memo_key, (json.loads(memo.read_text()) if memo.is_file() else {})


def quantized_key(config: ChromaConfig, model_dir: Path, device: DeviceInfo, precision: str) -> str:
    """Names the saved model: which transformer, at which precision and dtype, keeping which layers."""
    identity = models.component_identity(model_dir, "transformer")
    return quantization.quantized_model_key(identity, precision, device.compute_dtype(config.mixed_precision),
                                            tuple(config.base_model_keep_full_precision))


def build_quantized(config: ChromaConfig, layout: Layout, device: DeviceInfo, log=print) -> StepResult:
    model_dir = models.resolve_model_dir(config, layout.models_dir)
    precision, reason = decide_precision(config, layout, model_dir, device)
    needs = precision_estimates(config, model_dir, device, layout)[precision]
    log(f"{reason}; {needs.describe()}")
    about = {"precision": precision, "reason": reason, "estimate": needs}
    if precision == "no_change":  # nothing to save: later steps load the original weights
        identity = models.component_identity(model_dir, "transformer")
        return StepResult(identity, model_dir / "transformer", {**about, "reused": True})

    quantization.check_available(precision, device.kind, device.quantization_backends)
    key = quantized_key(config, model_dir, device, precision)
    folder = layout.quantized_dir(key)
    if quantization.is_complete(folder):
        log(f"reusing quantized transformer {folder}")
        manifest = json.loads((folder / "manifest.json").read_text())
        return StepResult(key, folder, {**manifest, **about, "reused": True})

    check_fits(needs.quantize_host_peak, host_available(), f"quantizing to {precision}",
               "Close other programs, or pick a smaller base_model_precision.")
    dtype = device.compute_dtype(config.mixed_precision)
    # A GPU quantizes far faster than the CPU; offload_during_startup keeps it free for others.
    on_device = "cpu" if device.kind == "cpu" or config.offload_during_startup else device.torch_device
    source = {"source": str(config.model_source), "revision": config.revision or "", "dtype": str(dtype)}
    keep = tuple(config.base_model_keep_full_precision)
    device.reset_peak_memory()
    with PeakRSS() as host:
        if precision in quantization.BNB_PRECISIONS:
            manifest = quantization.quantize_bnb_to_folder(model_dir / "transformer", precision, folder, source, dtype,
                                                           keep, log=log)
        else:
            manifest = quantization.quantize_to_folder(model_dir / "transformer", precision, folder, source, dtype=dtype,
                                                       device=on_device, keep=keep, log=log)
    # Both, named as what they are: a user sizing a machine needs the process peak; the rise is
    # what quantizing itself added to whatever the process already held.
    manifest["peak_host_bytes"], manifest["host_rise_bytes"] = host.peak, host.added
    write_json_atomic(folder / "manifest.json", manifest)  # the folder is complete; this only adds the figures
    log(f"saved {precision} transformer to {folder} ({manifest['bytes'] / 2**20:.1f} MiB, process peak "
        f"{host.peak / 2**30:.2f} GiB of host RAM, +{host.added / 2**30:.2f} GiB while quantizing, "
        f"{manifest['seconds']:.1f}s)")
    return StepResult(key, folder, {**manifest, **about, "reused": False})


def load_base_transformer(config: ChromaConfig, layout: Layout, device: DeviceInfo, precision: str | None = None):
    """The transformer as quantized_base_model saved it; never quantizes again."""
    model_dir = models.resolve_model_dir(config, layout.models_dir)
    precision = precision or decided_precision(config, layout, model_dir, device)[0]
    if precision == "no_change":
        dtype = device.compute_dtype(config.mixed_precision)
        return models.load_transformer(model_dir, dtype).to(device.torch_device)
    key = quantized_key(config, model_dir, device, precision)
    return quantization.load_quantized(layout.quantized_dir(key), device.torch_device)


def base_model_key(config: ChromaConfig, layout: Layout, device: DeviceInfo) -> str:
    """The key of the base model later steps train and render on."""
    model_dir = models.resolve_model_dir(config, layout.models_dir)
    return quantized_key(config, model_dir, device, decided_precision(config, layout, model_dir, device)[0])
