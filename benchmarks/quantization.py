"""Quantizing in bounded memory: load-then-quantize vs block by block, side by side in one run.

Generates a random-weight checkpoint with Chroma1's real width (hidden 3072, 24 heads of 128,
T5 width 4096, the real approximator) and enough blocks to weigh at least 3 GB in bf16,
written shard by shard so generating it never holds the whole model. Then, each in a fresh
process so peaks do not mix:

  (a) whole:  ChromaTransformer2DModel.from_pretrained (all bf16 weights in RAM), then quantize
  (b) stream: chroma_pipeline.quantize.quantize_to_folder (one bf16 block at a time)

(3 alternating runs of each by default) and prints the median and range of peak RSS and time,
the quantized size on disk, the goal for (b) (median peak <= 1.3 x quantized size + one bf16
block) and what the estimate says for the full 8.9B Chroma1.

    python benchmarks/quantization.py [--precision int8-quanto] [--double 4 --single 8]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CHROMA1 = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
               num_attention_heads=24, joint_attention_dim=4096, axes_dims_rope=[16, 56, 56], approximator_num_channels=64,
               approximator_hidden_dim=5120, approximator_layers=5)
GIB = 2**30


def make_checkpoint(folder: Path, double: int, single: int) -> int:
    """Random bf16 weights, one safetensors shard per block plus an index; returns the bytes written."""
    from accelerate import init_empty_weights
    from diffusers import ChromaTransformer2DModel
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    with init_empty_weights():
        model = ChromaTransformer2DModel.from_config({**CHROMA1, "num_layers": double, "num_single_layers": single})
    model.save_config(folder)
    groups: dict[str, list[str]] = {}
    for name, _ in model.named_parameters():
        parts = name.split(".")
        group = ".".join(parts[:2]) if parts[0] in ("transformer_blocks", "single_transformer_blocks") else "rest"
        groups.setdefault(group, []).append(name)
    generator = torch.Generator().manual_seed(0)
    parameters = dict(model.named_parameters())
    weight_map, total = {}, 0
    for number, names in enumerate(groups.values(), 1):
        tensors = {n: (torch.randn(parameters[n].shape, generator=generator) * 0.02).to(torch.bfloat16) for n in names}
        file = f"diffusion_pytorch_model-{number:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, str(folder / file))
        weight_map.update(dict.fromkeys(names, file))
        total += sum(t.numel() * 2 for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}  # the layout save_pretrained writes
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return total


def run_one(mode: str, checkpoint: Path, output: Path, precision: str) -> dict:
    """In this process: quantize `checkpoint` one way, report seconds and peak RSS."""
    import psutil

    from chroma_pipeline import quantize

    runtime = psutil.Process().memory_info().rss  # Python, torch and diffusers imported, nothing loaded
    started = time.perf_counter()
    if mode == "whole":
        from diffusers import ChromaTransformer2DModel

        model = ChromaTransformer2DModel.from_pretrained(checkpoint, torch_dtype=torch.bfloat16, use_safetensors=True)
        manifest = quantize.save_quantized(model, precision, output, {})
    else:
        manifest = quantize.quantize_to_folder(checkpoint, precision, output, {}, dtype=torch.bfloat16, log=lambda _m: None)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": seconds, "peak_rss": peak, "runtime": runtime, "bytes": manifest["bytes"]}


def spread(runs: list[dict], key: str, scale: float = 1.0) -> str:
    values = [run[key] / scale for run in runs]
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", default="int8-quanto")
    parser.add_argument("--double", type=int, default=4, help="double-stream blocks (Chroma1 has 19)")
    parser.add_argument("--single", type=int, default=8, help="single-stream blocks (Chroma1 has 38)")
    parser.add_argument("--runs", type=int, default=3, help="fresh-process runs of each path, alternating")
    parser.add_argument("--mode", choices=["whole", "stream"], help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.mode:  # the child process
        print(json.dumps(run_one(args.mode, args.checkpoint, args.output, args.precision)))
        return

    from chroma_pipeline.config import KEEP_FULL_PRECISION
    from chroma_pipeline.lora import target_modules
    from chroma_pipeline.memory import estimate

    with tempfile.TemporaryDirectory(prefix="chroma-quant-bench-") as tmp:
        checkpoint = Path(tmp) / "transformer"
        started = time.perf_counter()
        size = make_checkpoint(checkpoint, args.double, args.single)
        print(f"synthetic checkpoint: {args.double} double + {args.single} single blocks at Chroma1 width, "
              f"{size / GIB:.2f} GiB in bf16, written in {time.perf_counter() - started:.0f}s")
        runs = {"whole": [], "stream": []}
        for number in range(args.runs):  # alternating, so a slow spell of the machine hits both paths
            for mode in ("whole", "stream"):
                child = subprocess.run(
                    [sys.executable, __file__, "--mode", mode, "--checkpoint", str(checkpoint),
                     "--output", str(Path(tmp) / f"out-{mode}-{number}"), "--precision", args.precision],
                    capture_output=True, text=True,
                )
                if child.returncode:
                    raise SystemExit(f"the {mode} path failed:\n{child.stderr[-3000:]}")
                runs[mode].append(json.loads(child.stdout.strip().splitlines()[-1]))
                shutil.rmtree(Path(tmp) / f"out-{mode}-{number}")
        results = {mode: {key: statistics.median(r[key] for r in done) for key in done[0]} for mode, done in runs.items()}
        config = {**CHROMA1, "num_layers": args.double, "num_single_layers": args.single}
        block = estimate(config, args.precision, keep=KEEP_FULL_PRECISION).largest_block

    print(f"\n{args.precision}, {args.runs} alternating fresh-process runs of each path: median (min-max)")
    print(f"{'path':<34}{'peak RSS GiB':>20}{'of which runtime':>18}{'seconds':>20}{'on disk GiB':>13}")
    for mode, label in (("whole", "(a) load whole model, quantize"), ("stream", "(b) block by block")):
        r = results[mode]
        print(f"{label:<34}{spread(runs[mode], 'peak_rss', GIB):>20}{r['runtime'] / GIB:>18.2f}"
              f"{spread(runs[mode], 'seconds'):>20}{r['bytes'] / GIB:>13.2f}")
    quantized = results["stream"]["bytes"]
    goal = 1.3 * quantized + block
    ratio = results["stream"]["peak_rss"] / results["whole"]["peak_rss"]
    print(f"\n(b) / (a) peak RSS: {ratio:.2f}")
    print(f"(b) peak RSS / quantized size: {results['stream']['peak_rss'] / quantized:.2f}")
    print(f"goal for (b): <= 1.3 x {quantized / GIB:.2f} + one bf16 block {block / GIB:.2f} = {goal / GIB:.2f} GiB: "
          f"{'met' if results['stream']['peak_rss'] <= goal else 'NOT met'} ({results['stream']['peak_rss'] / GIB:.2f})")

    full = estimate(CHROMA1, args.precision, keep=KEEP_FULL_PRECISION, lora_pattern=target_modules("all", 38))
    whole_full = estimate(CHROMA1, "no_change").weights + full.weights
    print(f"\nFull Chroma1 (8.9B) at {args.precision}: quantized {full.weights / GIB:.1f} GiB; block by block needs about "
          f"{(full.weights + full.largest_block) / GIB:.1f} GiB of host RAM plus the runtime, load-then-quantize about "
          f"{whole_full / GIB:.1f} GiB (bf16 model + quantized copy) plus the runtime.")


if __name__ == "__main__":
    main()
