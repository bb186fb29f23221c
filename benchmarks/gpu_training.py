"""Full-size Chroma1 LoRA training on one GPU: peak memory and seconds per step per base precision.

No download: a random-weight transformer with Chroma1's exact config (8.9B parameters) is
built on the GPU. For each of bf16, int8-quanto, int4-quanto and nf4-bnb it trains a rank-16
LoRA ("all" targets) for a few steps at 1024x1024 (4096 image tokens + 512 text tokens) with
gradient checkpointing, through the same Chroma math the pipeline uses, and prints peak GPU
memory and the median seconds per step. The quickstart's figures to beat: 28 / 16 / 11 / 8 GB.
Without a CUDA/ROCm GPU it prints why and exits 0.

    python benchmarks/gpu_training.py [--precisions no_change,int8-quanto,int4-quanto,nf4-bnb] [--steps 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantization import CHROMA1  # noqa: E402

GIB = 2**30


def build(precision: str, tmp: Path):
    from diffusers import BitsAndBytesConfig, ChromaTransformer2DModel

    from chroma_pipeline.quantize import KEEP_FULL_PRECISION, quantize_model

    if precision == "nf4-bnb":  # bitsandbytes quantizes while loading, so the bf16 model goes to disk once
        folder = tmp / "bf16"
        if not folder.exists():
            with torch.device("cuda"):
                ChromaTransformer2DModel.from_config(CHROMA1).to(torch.bfloat16).save_pretrained(folder)
            torch.cuda.empty_cache()
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                                          llm_int8_skip_modules=[p.rstrip("*").rstrip(".") for p in KEEP_FULL_PRECISION])
        return ChromaTransformer2DModel.from_pretrained(folder, quantization_config=quantization, torch_dtype=torch.bfloat16)
    with torch.device("cuda"):
        model = ChromaTransformer2DModel.from_config(CHROMA1).to(torch.bfloat16)
    if precision != "no_change":
        quantize_model(model, precision)
    return model


def train(model, steps: int) -> list[float]:
    from chroma_pipeline.flow import add_noise, flow_target, image_position_ids, pack_latents, predict_velocity, sample_sigmas
    from chroma_pipeline.lora import lora_config

    model.requires_grad_(False)
    model.add_adapter(lora_config(16, 16, "all", model.config.num_single_layers))
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.data = p.data.float()
    model.enable_gradient_checkpointing()
    model.train()
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    generator = torch.Generator("cuda").manual_seed(0)
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        started = time.perf_counter()
        x0 = torch.randn(1, 16, 128, 128, device="cuda", generator=generator)  # a 1024x1024 image's latents
        embeds = torch.randn(1, 512, CHROMA1["joint_attention_dim"], device="cuda", generator=generator, dtype=torch.bfloat16)
        mask = torch.zeros(1, 512, dtype=torch.bool, device="cuda")
        mask[:, :78] = True  # a 77-token caption + one padding token
        latents = pack_latents(x0)
        noise = torch.randn(latents.shape, device="cuda", generator=generator)
        sigmas = sample_sigmas(1).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            velocity = predict_velocity(model, add_noise(latents, noise, sigmas).bfloat16(), sigmas, embeds, mask,
                                        image_position_ids(128, 128))
        torch.nn.functional.mse_loss(velocity.float(), flow_target(latents, noise)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precisions", default="no_change,int8-quanto,int4-quanto,nf4-bnb")
    parser.add_argument("--steps", type=int, default=4, help="the first is warm-up")
    parser.add_argument("--tmp", default=None, help="folder for nf4's 18 GB bf16 checkpoint")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("skipped: no CUDA or ROCm GPU here (this script measures full-size training on a GPU)")
        return 0
    print(f"GPU: {torch.cuda.get_device_name(0)}; rank-16 LoRA, 1024x1024, batch 1, gradient checkpointing")
    print(f"{'precision':<14}{'peak GPU GiB':>14}{'s/step':>9}{'setup s':>9}")
    with tempfile.TemporaryDirectory(prefix="chroma1-train-", dir=args.tmp) as tmp:
        for precision in args.precisions.split(","):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            try:
                model = build(precision, Path(tmp))
            except ImportError as exc:
                print(f"{precision:<14} skipped: {exc}")
                continue
            setup = time.perf_counter() - started
            times = train(model, args.steps)
            print(f"{precision:<14}{torch.cuda.max_memory_allocated() / GIB:>14.1f}"
                  f"{statistics.median(times[1:] or times):>9.2f}{setup:>9.0f}", flush=True)
            del model
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
