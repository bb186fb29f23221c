"""Quantize the Chroma transformer once, save it, and reload it without quantizing again.

A saved model is a folder: the quantized state dict (safetensors), quanto's
quantization map, the transformer config and a manifest of what made it. The folder
is written under a temporary name and renamed, so a half-written one never exists.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .storage import atomic_dir, combine_hashes, write_json_atomic

QUANTO_PRECISIONS = ("int8-quanto", "int4-quanto", "int2-quanto", "fp8-quanto")
# Small layers that steer the whole network; quantizing them costs quality and saves little.
KEEP_FULL_PRECISION = ("distilled_guidance_layer*", "x_embedder", "context_embedder", "proj_out", "norm_out*")


def _quanto_weights(precision: str):
    from optimum import quanto

    return {
        "int8-quanto": quanto.qint8,
        "int4-quanto": quanto.qint4,
        "int2-quanto": quanto.qint2,
        "fp8-quanto": quanto.qfloat8,
    }[precision]


def quanto_version() -> str:
    from optimum.quanto import __version__

    return __version__


def quantized_model_key(transformer_identity: str, precision: str, dtype: torch.dtype) -> str:
    return combine_hashes(transformer_identity, precision, str(dtype), ",".join(KEEP_FULL_PRECISION), quanto_version())


def is_complete(folder: Path) -> bool:
    return (Path(folder) / "manifest.json").is_file()


def quantize_model(model, precision: str, keep: tuple[str, ...] = KEEP_FULL_PRECISION):
    """Quantize in place with optimum-quanto and freeze (weights become int/fp8 tensors)."""
    from optimum.quanto import freeze, quantize

    quantize(model, weights=_quanto_weights(precision), exclude=list(keep) or None)
    freeze(model)
    return model


def save_quantized(transformer, precision: str, target: Path, source: dict) -> dict:
    """Quantize `transformer` and write the folder at `target`; returns its manifest."""
    from optimum.quanto import __version__ as quanto_version
    from optimum.quanto import quantization_map
    from safetensors.torch import save_file

    started = time.perf_counter()
    quantize_model(transformer, precision)
    qmap = quantization_map(transformer)
    total = sum(p.numel() for p in transformer.state_dict().values())
    quantized_params = sum(
        module.weight.numel() for name, module in transformer.named_modules() if name in qmap
    )
    with atomic_dir(target) as staging:
        save_file({k: v.contiguous() for k, v in transformer.state_dict().items()}, str(staging / "model.safetensors"))
        (staging / "quantization_map.json").write_text(json.dumps(qmap, indent=1, sort_keys=True))
        transformer.save_config(staging)  # config.json, as diffusers writes it
        manifest = {
            "precision": precision,
            "kept_full_precision": list(KEEP_FULL_PRECISION),
            "quantized_layers": len(qmap),
            "quantized_parameters": int(quantized_params),
            "kept_parameters": int(total - quantized_params),
            "optimum_quanto": quanto_version,
            "seconds": round(time.perf_counter() - started, 3),
            "bytes": (staging / "model.safetensors").stat().st_size,
            **source,
        }
        write_json_atomic(staging / "manifest.json", manifest)  # last: its presence marks the folder complete
    return manifest


def load_quantized(folder: Path, device: str):
    """Rebuild the transformer skeleton without allocating weights, then fill it from the saved file."""
    from accelerate import init_empty_weights
    from diffusers import ChromaTransformer2DModel
    from optimum.quanto import requantize
    from safetensors.torch import load_file

    folder = Path(folder)
    if not is_complete(folder):
        raise FileNotFoundError(f"no complete quantized model in {folder}: materialize quantized_base_model first")
    with init_empty_weights():
        transformer = ChromaTransformer2DModel.from_config(ChromaTransformer2DModel.load_config(folder))
    qmap = json.loads((folder / "quantization_map.json").read_text())
    requantize(transformer, load_file(str(folder / "model.safetensors")), qmap, device=torch.device(device))
    transformer.eval()
    return transformer
