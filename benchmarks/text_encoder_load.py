"""How long loading T5 takes, per GB, on an encoder of T5-XXL's width (what a caption edit pays before encoding).

Writes a random T5 encoder with T5-XXL's d_model 4096, d_ff 10240, 64 heads and vocabulary,
but `--layers` blocks instead of 24, straight to safetensors in bf16 (never built in fp32),
then loads it with `chroma_pipeline.models.load_text_encoder` and encodes one short caption
(so every weight is read), in fresh processes: seconds, GB/s, and peak RSS against the file
size (a load through an fp32 copy would show about 2x).
Run 1 reads from disk if the page cache does not hold the file yet; the others from memory.

    python benchmarks/text_encoder_load.py [--layers 2] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

XXL = dict(d_model=4096, d_ff=10240, num_heads=64, d_kv=64, vocab_size=32128, feed_forward_proj="gated-gelu",
           is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False)
XXL_LAYERS, XXL_BYTES_BF16 = 24, 9.52e9  # the real encoder: 4.76 B parameters


def write_encoder(folder: Path, layers: int) -> int:
    """A random encoder of this shape in `folder`/text_encoder; returns its bytes on disk."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import T5Config, T5EncoderModel

    config = T5Config(**XXL, num_layers=layers)
    with init_empty_weights():
        skeleton = T5EncoderModel(config)
    generator = torch.Generator().manual_seed(0)
    tensors = {name: (torch.randn(p.shape, generator=generator) * 0.02).to(torch.bfloat16)
               for name, p in skeleton.state_dict().items() if name != "encoder.embed_tokens.weight"}  # tied to shared
    target = folder / "text_encoder"
    target.mkdir(parents=True)
    config.save_pretrained(target)
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    return (target / "model.safetensors").stat().st_size


def load_once(folder: Path) -> dict:
    from chroma_pipeline.models import load_text_encoder

    started = time.perf_counter()
    encoder = load_text_encoder(folder, torch.bfloat16)
    loaded = time.perf_counter()
    assert next(encoder.parameters()).dtype == torch.bfloat16
    with torch.no_grad():  # one short caption: every weight is read once (a lazily mapped file shows its cost here)
        encoder(torch.arange(16)[None])
    return {"seconds": time.perf_counter() - started, "load_only": loaded - started, "peak_rss": peak_rss()}


def peak_rss() -> int:
    """This process's peak resident memory since its exec (getrusage would count what its parent held at fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(load_once(args.child)))
        return

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    with tempfile.TemporaryDirectory(prefix="chroma-t5-load-") as tmp:
        size = write_encoder(Path(tmp), args.layers)
        # The runtime (python, torch, transformers) without any weights, to subtract from the peaks.
        baseline = subprocess.run([sys.executable, "-c", "import torch, transformers, benchmarks.text_encoder_load as b; "
                                   "from transformers import T5EncoderModel; print(b.peak_rss())"],
                                  capture_output=True, text=True, env=env, check=True, cwd=repo)
        runtime = int(baseline.stdout.strip())
        runs = []
        for _ in range(args.runs):
            child = subprocess.run([sys.executable, __file__, "--child", tmp], capture_output=True, text=True, env=env)
            if child.returncode:
                raise SystemExit(child.stderr[-3000:])
            runs.append(json.loads(child.stdout.strip().splitlines()[-1]))
    seconds = [r["seconds"] for r in runs]
    rates = [size / 1e9 / s for s in seconds]
    peaks = [(r["peak_rss"] - runtime) / size for r in runs]
    print(f"T5 encoder at T5-XXL width, {args.layers} of {XXL_LAYERS} blocks, bf16: {size / 1e9:.2f} GB on disk; "
          f"CPU ({os.cpu_count()} cores), load average {os.getloadavg()[0]:.2f}; {args.runs} fresh processes")
    print("load + one 16-token encode, seconds: " + ", ".join(f"{s:.2f}" for s in seconds)
          + " (from_pretrained alone: " + ", ".join(f"{r['load_only']:.2f}" for r in runs) + "); "
          f"median {statistics.median(rates):.2f} GB/s ({min(rates):.2f}–{max(rates):.2f})")
    print(f"peak RSS above the runtime / file size: median {statistics.median(peaks):.2f} ({min(peaks):.2f}–{max(peaks):.2f})")
    print(f"the full T5-XXL ({XXL_BYTES_BF16 / 1e9:.1f} GB in bf16) at that rate: "
          f"{XXL_BYTES_BF16 / 1e9 / statistics.median(rates):.1f} s")


if __name__ == "__main__":
    main()
