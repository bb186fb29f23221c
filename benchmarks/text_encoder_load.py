"""How long loading T5 takes, per GB, on an encoder of T5-XXL's width (what a caption edit pays before encoding).

Writes a random T5 encoder with T5-XXL's d_model 4096, d_ff 10240, 64 heads and vocabulary,
but `--layers` blocks instead of 24, straight to safetensors in bf16 (never built in fp32),
then loads it with `chroma_pipeline.models.load_text_encoder` and encodes one short caption
(so every weight is read), in fresh processes: seconds, GB/s, and peak RSS against the file
size (a load through an fp32 copy would show about 2x).
Run 1 reads from disk if the page cache does not hold the file yet; the others from memory.

Three ways, alternating in fresh processes: `bf16` (text_encoder_precision no_change), `int8 saved`
(int8-quanto read back from the folder `text_embeddings` saved the first time) and `int8 on the fly`
(bf16 loaded, then quantized in the process: what every caption edit paid before the folder existed).

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


MODES = ("bf16", "int8 saved", "int8 on the fly")


def load_once(folder: Path, mode: str) -> dict:
    from chroma_pipeline.layout import Layout
    from chroma_pipeline.models import load_text_encoder
    from chroma_pipeline.quantize import quantize_model
    from chroma_pipeline.text_embeddings import quantized_text_encoder

    started = time.perf_counter()
    if mode == "bf16":
        encoder = load_text_encoder(folder, torch.bfloat16)
    elif mode == "int8 saved":
        encoder = quantized_text_encoder(folder, Layout(folder / "output"), torch.bfloat16, "cpu", log=lambda _: None)
    else:
        encoder = quantize_model(load_text_encoder(folder, torch.bfloat16), "int8-quanto", keep=())
    loaded = time.perf_counter()
    assert encoder.shared.weight.dtype == torch.bfloat16
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
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(load_once(args.child, args.mode)))
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
        # The int8 folder, as the first int8 caption run leaves it (not timed).
        subprocess.run([sys.executable, "-c", "from pathlib import Path; import torch; from chroma_pipeline.layout import "
                        "Layout; from chroma_pipeline.text_embeddings import quantized_text_encoder as q; "
                        f"q(Path({tmp!r}), Layout(Path({tmp!r}) / 'output'), torch.bfloat16, 'cpu')"],
                       env=env, check=True, cwd=repo, capture_output=True)
        int8_size = sum(p.stat().st_size for p in (Path(tmp) / "output").rglob("*.safetensors"))
        runs = {mode: [] for mode in MODES}
        for _ in range(args.runs):
            for mode in MODES:
                child = subprocess.run([sys.executable, __file__, "--child", tmp, "--mode", mode], capture_output=True,
                                       text=True, env=env)
                if child.returncode:
                    raise SystemExit(f"{mode} failed (exit {child.returncode}):\n{child.stderr[-3000:]}")
                runs[mode].append(json.loads(child.stdout.strip().splitlines()[-1]))

    def spread(values: list[float]) -> str:
        return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"

    print(f"T5 encoder at T5-XXL width, {args.layers} of {XXL_LAYERS} blocks: {size / 1e9:.2f} GB on disk in bf16, "
          f"{int8_size / 1e9:.2f} GB saved in int8; CPU ({os.cpu_count()} cores), load average "
          f"{os.getloadavg()[0]:.2f}; {args.runs} fresh processes each, alternating")
    bf16_rate = statistics.median(size / 1e9 / r["seconds"] for r in runs["bf16"])
    for mode in MODES:
        seconds = [r["seconds"] for r in runs[mode]]
        peaks = [(r["peak_rss"] - runtime) / size for r in runs[mode]]
        print(f"{mode:>16}: load + one 16-token encode {spread(seconds)} s (loading alone "
              f"{spread([r['load_only'] for r in runs[mode]])} s), peak RSS above the runtime / bf16 file "
              f"{spread(peaks)}")
    saved, fly = (statistics.median(r["seconds"] for r in runs[m]) for m in ("int8 saved", "int8 on the fly"))
    print(f"bf16: {bf16_rate:.2f} GB/s; the full T5-XXL ({XXL_BYTES_BF16 / 1e9:.1f} GB in bf16) at that rate: "
          f"{XXL_BYTES_BF16 / 1e9 / bf16_rate:.1f} s; int8 saved / int8 on the fly: {saved / fly:.2f}x, the full "
          f"T5-XXL in int8 read back: ~{saved * XXL_BYTES_BF16 / size:.1f} s")


if __name__ == "__main__":
    main()
