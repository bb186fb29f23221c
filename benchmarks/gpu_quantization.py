"""Full-size Chroma1 on one GPU: quantize to int8-quanto, int4-quanto and nf4-bnb; host and GPU memory, time.

No download: a random-weight transformer with Chroma1's exact config (8.9B parameters,
19 double and 38 single blocks) is written as bf16 safetensors shards to a temporary folder
(about 18 GB of disk), then each precision goes through the same code the
`quantized_base_model` asset runs. Without a CUDA/ROCm GPU it prints why and exits 0.

    python benchmarks/gpu_quantization.py [--precisions int8-quanto,int4-quanto,nf4-bnb] [--tmp /local/ssd]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantization import CHROMA1, make_checkpoint  # noqa: E402  (the same generator as the CPU benchmark)

GIB = 2**30


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precisions", default="int8-quanto,int4-quanto,nf4-bnb")
    parser.add_argument("--tmp", default=None, help="folder for the 18 GB random checkpoint (default: system temp)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("skipped: no CUDA or ROCm GPU here (this script measures GPU quantization of the full-size model)")
        return 0

    from chroma_pipeline.memory import PeakRSS
    from chroma_pipeline.quantize import check_available, quantize_bnb_to_folder, quantize_to_folder

    device = "cuda"
    print(f"GPU: {torch.cuda.get_device_name(0)}, {torch.cuda.get_device_properties(0).total_memory / GIB:.0f} GiB")
    with tempfile.TemporaryDirectory(prefix="chroma1-random-", dir=args.tmp) as tmp:
        started = time.perf_counter()
        size = make_checkpoint(Path(tmp) / "transformer", CHROMA1["num_layers"], CHROMA1["num_single_layers"])
        print(f"random Chroma1 checkpoint: {size / GIB:.1f} GiB bf16, written in {time.perf_counter() - started:.0f}s")
        print(f"\n{'precision':<14}{'seconds':>9}{'host peak GiB':>15}{'GPU peak GiB':>14}{'on disk GiB':>13}")
        for precision in args.precisions.split(","):
            try:
                check_available(precision, "cuda", ("quanto", "bitsandbytes"))
            except RuntimeError as exc:
                print(f"{precision:<14} skipped: {exc}")
                continue
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            out = Path(tmp) / f"out-{precision}"
            started = time.perf_counter()
            with PeakRSS() as host:
                if precision.endswith("-bnb"):
                    manifest = quantize_bnb_to_folder(Path(tmp) / "transformer", precision, out, {}, torch.bfloat16,
                                                      log=lambda _m: None)
                else:
                    manifest = quantize_to_folder(Path(tmp) / "transformer", precision, out, {}, dtype=torch.bfloat16,
                                                  device=device, log=lambda _m: None)
            seconds = time.perf_counter() - started
            print(f"{precision:<14}{seconds:>9.1f}{host.peak / GIB:>15.2f}"
                  f"{torch.cuda.max_memory_allocated() / GIB:>14.2f}{manifest['bytes'] / GIB:>13.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
