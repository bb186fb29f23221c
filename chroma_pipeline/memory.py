"""Host memory: what a step peaked at, and what a model will need before it is loaded."""

from __future__ import annotations

import functools
import json
import threading
from dataclasses import dataclass
from importlib.metadata import version

import psutil

from .errors import DoesNotFit
from .storage import combine_hashes, user_cache_file, write_json_atomic


class PeakRSS:
    """The highest resident set size of this process while the block runs, sampled every 20 ms.

    `ru_maxrss` would report the peak of the whole process life, which includes whatever an
    earlier step of the same Dagster run loaded.
    """

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak, self.start = interval, 0, 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakRSS:
        process = psutil.Process()
        self.start = self.peak = process.memory_info().rss

        def sample():
            while not self._stop.wait(self.interval):
                self.peak = max(self.peak, process.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, psutil.Process().memory_info().rss)

    @property
    def added(self) -> int:
        """Bytes above what the process held when the block started."""
        return self.peak - self.start


# Bits per quantized weight, and bytes of scale/shift per group of weights.
BITS = {"no_change": 16, "int8-quanto": 8, "fp8-quanto": 8, "int4-quanto": 4, "int2-quanto": 2, "nf4-bnb": 4, "int8-bnb": 8}
GROUP = {"int4-quanto": (128, 4), "int2-quanto": (128, 4), "nf4-bnb": (64, 1)}  # (group size, bytes per group)
# From most to least precise; `auto` takes the first that fits.
AUTO_ORDER = ("no_change", "int8-quanto", "int4-quanto", "int2-quanto")
OVERHEAD = 1.5 * 2**30  # CUDA context, allocator slack, python + torch on the host (assumed, not measured)
# Activations the backward pass keeps, in bf16 hidden states of all tokens, measured on the CPU on
# real-width blocks (2+2 and 4+4 blocks, 256 and 512 px, LoRA rank 16 on `all`: tests/test_memory_estimate.py):
# without checkpointing a double block keeps 15.3 of them and a single block 14.3, the rest of the
# model 0.2; with checkpointing a block keeps its input (1.0) and the rest of the model 1.0.
INSIDE_DOUBLE, INSIDE_SINGLE, OUTSIDE_BLOCKS = 15.3, 14.3, 0.2
KEPT_PER_CHECKPOINTED_BLOCK, OUTSIDE_CHECKPOINTED = 1.0, 1.0
SHAPES_VERSION = 1  # of what `module_shapes` remembers: bump when `_measure_shapes` records something else
AUTO_SHARE = 0.9  # `auto` fills at most this share of free memory: room for fragmentation and the VAE during renders


@dataclass(frozen=True)
class Estimate:
    precision: str
    weights: int  # the transformer at this precision
    lora: int  # LoRA parameters, gradients and AdamW state, fp32
    activations: int  # what the backward pass keeps, at train_batch_size and resolution
    quantize_host_peak: int  # host RAM while quantizing (streaming: result + one bf16 block)
    largest_block: int  # bf16 bytes of the largest block

    @property
    def training_device(self) -> int:
        return self.weights + self.lora + self.activations + int(OVERHEAD)

    def describe(self) -> str:
        gib = 2**30
        return (
            f"{self.precision}: training needs about {self.training_device / gib:.1f} GiB on the device "
            f"(weights {self.weights / gib:.1f}, LoRA + optimizer {self.lora / gib:.2f}, activations "
            f"{self.activations / gib:.1f}, overhead {OVERHEAD / gib:.1f}); quantizing needs about "
            f"{self.quantize_host_peak / gib:.1f} GiB of host RAM"
        )


def estimate(transformer_config: dict, precision: str, *, keep=(), rank: int = 16, lora_pattern: str | None = None,
             bucket: tuple[int, int] = (1024, 1024), batch_size: int = 1, text_tokens: int = 512,
             gradient_checkpointing: bool = True, bytes_per_kept: int = 2) -> Estimate:
    """Memory for training a LoRA on the transformer at `precision`, from its shapes alone (meta device).

    `bucket` is the largest (width, height) training will see: activations grow with its pixels.
    """
    return _estimate(json.dumps(transformer_config, sort_keys=True, default=str), precision, tuple(keep), rank,
                     lora_pattern, tuple(bucket), batch_size, text_tokens, gradient_checkpointing, bytes_per_kept)


@functools.lru_cache(maxsize=64)  # every step asks
def _estimate(transformer_config: str, precision: str, keep: tuple, rank: int, lora_pattern: str | None,
              bucket: tuple[int, int], batch_size: int, text_tokens: int, gradient_checkpointing: bool,
              bytes_per_kept: int) -> Estimate:
    import re

    from .quantize import is_kept

    shapes = module_shapes(transformer_config)
    bits = BITS[precision]
    weights = lora_params = 0
    for name, in_features, out_features, bias in shapes["linear"]:
        kept = precision == "no_change" or is_kept(name, keep)
        numel = in_features * out_features
        if kept:
            weights += numel * bytes_per_kept
        else:
            group, group_bytes = GROUP.get(precision, (in_features, 2))  # per-channel scale otherwise
            weights += numel * bits // 8 + (numel // group) * group_bytes
        weights += bias * bytes_per_kept
        if lora_pattern and re.fullmatch(lora_pattern, name):
            lora_params += rank * (in_features + out_features)
    weights += shapes["other_parameters"] * bytes_per_kept
    largest_block = shapes["largest_block_parameters"] * 2
    tokens = (bucket[0] // 16) * (bucket[1] // 16) + text_tokens  # 8x VAE, then 2x2 patches
    per_block_io = batch_size * tokens * shapes["hidden"] * 2  # one bf16 hidden state of every token
    # What the backward pass keeps (the measured constants above). With checkpointing, the block
    # being recomputed during the backward also holds its internals, as measured without it.
    doubles, singles = shapes["double_blocks"], shapes["single_blocks"]
    if gradient_checkpointing:
        recomputed = INSIDE_DOUBLE if doubles else INSIDE_SINGLE
        kept = OUTSIDE_CHECKPOINTED + (doubles + singles) * KEPT_PER_CHECKPOINTED_BLOCK + recomputed
    else:
        kept = OUTSIDE_BLOCKS + doubles * INSIDE_DOUBLE + singles * INSIDE_SINGLE
    activations = kept * per_block_io
    quantize_host_peak = (weights if precision != "no_change" else 0) + largest_block + int(OVERHEAD)
    return Estimate(precision, int(weights), int(lora_params * 16), int(activations), int(quantize_host_peak),
                    int(largest_block))


@functools.lru_cache(maxsize=8)
def module_shapes(transformer_config: str) -> dict:
    """What the estimate reads of the transformer built from `transformer_config` (JSON): every Linear
    (name, in and out features, bias size), the other parameters, the largest block, the width and
    the block counts. Remembered on disk per config and diffusers version: building the skeleton
    means importing diffusers, seconds that a re-run with every cache valid would spend on nothing."""
    memo_file = user_cache_file("transformer-shapes.json")
    memo_key = combine_hashes(transformer_config, version("diffusers"), str(SHAPES_VERSION))
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if memo_key not in memo:
        memo[memo_key] = _measure_shapes(json.loads(transformer_config))
        try:
            write_json_atomic(memo_file, memo)
        except OSError:  # a read-only home: estimate every time
            pass
    return memo[memo_key]


def _measure_shapes(transformer_config: dict) -> dict:
    import torch
    from accelerate import init_empty_weights
    from diffusers import ChromaTransformer2DModel

    with init_empty_weights():
        model = ChromaTransformer2DModel.from_config(transformer_config)
    linear, other = [], 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            linear.append([name, module.in_features, module.out_features,
                           module.bias.numel() if module.bias is not None else 0])
        elif not list(module.children()):
            other += sum(p.numel() for p in module.parameters(recurse=False))
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    return {
        "linear": linear, "other_parameters": other,
        "largest_block_parameters": max(sum(p.numel() for p in block.parameters()) for block in blocks),
        "hidden": model.config.num_attention_heads * model.config.attention_head_dim,
        "double_blocks": len(model.transformer_blocks), "single_blocks": len(model.single_transformer_blocks),
    }


def host_available() -> int:
    return int(psutil.virtual_memory().available)


def choose_precision(requested: str, estimates: dict[str, Estimate], device_kind: str, device_free: int) -> tuple[str, str]:
    """The precision to quantize to, and a sentence saying why. `auto` takes the most precise that fits."""
    if requested != "auto":
        return requested, f"base_model_precision is {requested!r}"
    budget = int(device_free * AUTO_SHARE)
    for precision in AUTO_ORDER:
        if estimates[precision].training_device <= budget:
            return precision, (
                f"auto: {precision} is the most precise option whose training footprint fits in {AUTO_SHARE:.0%} of the "
                f"{device_free / 2**30:.1f} GiB free on {device_kind} ({estimates[precision].describe()})"
            )
    smallest = estimates[AUTO_ORDER[-1]]
    raise DoesNotFit(
        f"base_model_precision 'auto': even {smallest.describe()}, more than the {device_free / 2**30:.1f} GiB free "
        f"on {device_kind}. Free memory, lower resolution or train_batch_size, or use a larger device."
    )


def check_fits(needed: int, available: int, what: str, advice: str) -> None:
    """Stop before loading anything when the machine cannot hold it."""
    if needed > available:
        raise DoesNotFit(
            f"{what} needs about {needed / 2**30:.1f} GiB but only {available / 2**30:.1f} GiB is available. {advice}"
        )
