"""Step `quantized_base_model`: the Chroma transformer at `base_model_precision`, quantized once and reloaded.

Also the one place that says which precision a run uses (`resolve_precision`) and where
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
from .device import DeviceInfo
from .layout import Layout, StepResult
from .lora import target_modules
from .memory import AUTO_ORDER, Estimate, PeakRSS, check_fits, choose_precision, estimate, host_available
from .storage import combine_hashes, write_json_atomic

SETTINGS = ("output_dir", *models.MODEL_SETTINGS, "base_model_precision", "base_model_keep_full_precision")


def precision_estimates(config: ChromaConfig, model_dir: Path, device: DeviceInfo) -> dict[str, Estimate]:
    """Training and quantizing memory at every precision `auto` may pick, and the configured one."""
    transformer_config = json.loads((model_dir / "transformer" / "config.json").read_text())
    return estimates_for(config, transformer_config, device)


def estimates_for(config: ChromaConfig, transformer_config: dict, device: DeviceInfo) -> dict[str, Estimate]:
    """`precision_estimates` from a transformer config alone: no model on disk needed (`configure` uses it)."""
    kept_bytes = torch.finfo(device.compute_dtype(config.mixed_precision)).bits // 8
    candidates = {*AUTO_ORDER, config.base_model_precision} - {"auto"}
    return {
        precision: estimate(
            transformer_config, precision, keep=tuple(config.base_model_keep_full_precision), rank=config.network_rank,
            lora_pattern=target_modules(config.flux_lora_target, transformer_config["num_single_layers"]),
            resolution=config.validation_size, batch_size=config.train_batch_size,
            text_tokens=config.tokenizer_max_length, gradient_checkpointing=config.gradient_checkpointing,
            bytes_per_kept=kept_bytes,
        )
        for precision in candidates
    }


def resolve_precision(config: ChromaConfig, layout: Layout, model_dir: Path, device: DeviceInfo) -> tuple[str, str]:
    """The precision this run uses, and why. An `auto` choice is remembered per model and device,
    so later steps and later runs agree (and reuse the same quantized model) while it still fits."""
    requested = config.base_model_precision
    estimates = precision_estimates(config, model_dir, device)
    if requested != "auto":
        return choose_precision(requested, estimates, device.kind, 0)
    memo = layout.models_dir / "auto_precision.json"
    memo_key = combine_hashes(models.component_identity(model_dir, "transformer"), device.name,
                              config.settings_hash("network_rank", "flux_lora_target", "train_batch_size", "resolution",
                                                   "resolution_type", "gradient_checkpointing", "mixed_precision"))
    remembered = json.loads(memo.read_text()) if memo.is_file() else {}
    free = device.free_memory_bytes()
    if memo_key in remembered:
        precision, reason = remembered[memo_key]
        if estimates[precision].training_device <= free:
            return precision, reason + " (remembered)"
    precision, reason = choose_precision("auto", estimates, device.kind, free)
    memo.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(memo, {**remembered, memo_key: [precision, reason]})
    return precision, reason


def quantized_key(config: ChromaConfig, model_dir: Path, device: DeviceInfo, precision: str) -> str:
    """Names the saved model: which transformer, at which precision and dtype, keeping which layers."""
    identity = models.component_identity(model_dir, "transformer")
    return quantization.quantized_model_key(identity, precision, device.compute_dtype(config.mixed_precision),
                                            tuple(config.base_model_keep_full_precision))


def build_quantized(config: ChromaConfig, layout: Layout, device: DeviceInfo, log=print) -> StepResult:
    model_dir = models.resolve_model_dir(config, layout.models_dir)
    precision, reason = resolve_precision(config, layout, model_dir, device)
    needs = precision_estimates(config, model_dir, device)[precision]
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
    manifest["peak_host_bytes"] = host.added
    write_json_atomic(folder / "manifest.json", manifest)  # the folder is complete; this only adds the figure
    log(f"saved {precision} transformer to {folder} ({manifest['bytes'] / 2**20:.1f} MiB, host RAM peak "
        f"+{host.added / 2**30:.2f} GiB, {manifest['seconds']:.1f}s)")
    return StepResult(key, folder, {**manifest, **about, "reused": False})


def load_base_transformer(config: ChromaConfig, layout: Layout, device: DeviceInfo, precision: str | None = None):
    """The transformer as quantized_base_model saved it; never quantizes again."""
    model_dir = models.resolve_model_dir(config, layout.models_dir)
    precision = precision or resolve_precision(config, layout, model_dir, device)[0]
    if precision == "no_change":
        dtype = device.compute_dtype(config.mixed_precision)
        return models.load_transformer(model_dir, dtype).to(device.torch_device)
    key = quantized_key(config, model_dir, device, precision)
    return quantization.load_quantized(layout.quantized_dir(key), device.torch_device)


def base_model_key(config: ChromaConfig, layout: Layout, device: DeviceInfo) -> str:
    """The key of the base model later steps train and render on."""
    model_dir = models.resolve_model_dir(config, layout.models_dir)
    return quantized_key(config, model_dir, device, resolve_precision(config, layout, model_dir, device)[0])
