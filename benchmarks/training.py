"""Training overhead: our loop (`chroma_pipeline.training.train_lora`) vs a bare PyTorch loop, side by side.

Both train the same rank-16 LoRA ("all" targets) with AdamW at batch 2 on a random Chroma of
Chroma1's block structure but small width (hidden 512, 2 double + 4 single blocks), on the
same cached latents and embeddings of 24 generated 256x256 images. The bare loop has the
data in memory and does only noise, forward, loss, backward, step; ours reads the caches,
samples the VAE posterior, buckets, clips, schedules and logs as in production. Each runs
in a fresh process (peak RSS does not mix), twice, alternating; the figure is the median
seconds per step after 5 warm-up steps.

    python benchmarks/training.py [--steps 40]
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

WIDTH = dict(num_layers=2, num_single_layers=4, attention_head_dim=128, num_attention_heads=4, axes_dims_rope=[16, 56, 56])
WARMUP = 5


def prepare(root: Path) -> Path:
    """A project with a mid-size random transformer beside the tiny VAE/T5, caches built; returns the config."""
    from dagster import DagsterInstance
    from diffusers import ChromaTransformer2DModel

    from assets.definitions import materialize_chain
    from chroma_pipeline.demo_data import demo_config, make_demo_dataset
    from chroma_pipeline.tiny import build_tiny_chroma

    tiny = build_tiny_chroma(root / "tiny")
    model = root / "model"
    shutil.copytree(tiny, model, symlinks=False, ignore=shutil.ignore_patterns("transformer"))
    config = {**ChromaTransformer2DModel.load_config(tiny / "transformer"), **WIDTH}
    torch.manual_seed(0)
    ChromaTransformer2DModel.from_config(config).save_pretrained(model / "transformer")
    make_demo_dataset(root / "dataset", count=24)
    values = demo_config(root / "dataset", root / "output")
    values.update(pretrained_model_name_or_path=str(model), model_flavour="base", base_model_precision="no_change",
                  network_rank=16, train_batch_size=2, validation_steps=0, gradient_checkpointing=False,
                  resolution=256)
    path = root / "config.json"
    path.write_text(json.dumps(values))
    caches = ["raw_dataset/images", "raw_dataset/captions", "image_latents", "text_embeddings", "quantized_base_model"]
    assert materialize_chain(str(path), DagsterInstance.ephemeral(), selection=caches, device="cpu").success
    return path


def run(mode: str, config_path: Path, steps: int) -> dict:
    """In this process: train `steps` steps one way; returns per-step seconds and peak RSS."""
    from chroma_pipeline import models
    from chroma_pipeline.config import load_config
    from chroma_pipeline.device import detect_device
    from chroma_pipeline.flow import add_noise, flow_target, image_position_ids, pack_latents, predict_velocity, sample_sigmas
    from chroma_pipeline.latents import load_latent_entry, scale_latents
    from chroma_pipeline.layout import Layout
    from chroma_pipeline.lora import lora_config
    from chroma_pipeline.lora_adapter import training_samples
    from chroma_pipeline.shards import ShardStore
    from chroma_pipeline.text import load_embedding
    from chroma_pipeline.training import bucket_batches, train_lora

    config = load_config(config_path, max_train_steps=steps, checkpointing_steps=10**6)
    layout = Layout(Path(config.output_dir))
    model_dir = models.resolve_model_dir(config, layout.models_dir)
    samples, empty_key = training_samples(layout)
    vae, width = models.vae_config(model_dir), models.text_width(model_dir)
    transformer = models.load_transformer(model_dir, torch.float32)
    times: list[float] = []

    if mode == "ours":
        last = [time.perf_counter()]

        def clock(_message: str) -> None:  # called every step (log_every=1): the log line is part of our cost
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now

        with tempfile.TemporaryDirectory() as out:
            train_lora(config, transformer, samples, empty_key, layout.latent_dir, layout.embedding_dir, vae, width,
                       Path(out) / "adapter", detect_device("cpu"), log=clock, log_every=1)
    else:
        torch.manual_seed(config.seed)
        generator = torch.Generator().manual_seed(config.seed)
        transformer.requires_grad_(False)
        transformer.add_adapter(lora_config(16, 16, "all", transformer.config.num_single_layers))
        trainable = [p for p in transformer.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=1e-2)
        store = ShardStore(layout.latent_dir)
        data = []
        for sample in samples:  # everything in memory up front: the loop below does nothing but train
            entry = load_latent_entry(store, sample.latent, vae["latent_channels"])
            text = load_embedding(layout.embedding_dir, sample.embedding_key, config.tokenizer_max_length, width)
            data.append((scale_latents(entry["mean"][None].float(), vae["shift_factor"], vae["scaling_factor"]), text))
        batches = bucket_batches(samples, 2, config.seed)
        transformer.train()
        for _ in range(steps):
            started = time.perf_counter()
            batch = next(batches)
            x0 = torch.cat([data[i][0] for i in batch])
            embeds = torch.stack([data[i][1]["prompt_embeds"] for i in batch])
            mask = torch.stack([data[i][1]["attention_mask"] for i in batch])
            latents = pack_latents(x0)
            noise = torch.randn(latents.shape, generator=generator)
            sigmas = sample_sigmas(latents.shape[0], generator)
            velocity = predict_velocity(transformer, add_noise(latents, noise, sigmas), sigmas, embeds, mask,
                                        image_position_ids(x0.shape[2], x0.shape[3]))
            torch.nn.functional.mse_loss(velocity, flow_target(latents, noise)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - started)
    return {"per_step": statistics.median(times[WARMUP:]), "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--mode", choices=["ours", "bare"], help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run(args.mode, args.config, args.steps)))
        return

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    with tempfile.TemporaryDirectory(prefix="chroma-train-bench-") as tmp:
        config = prepare(Path(tmp))
        results: dict[str, list[dict]] = {"ours": [], "bare": []}
        for mode in ("bare", "ours", "bare", "ours"):
            child = subprocess.run([sys.executable, __file__, "--mode", mode, "--config", str(config),
                                    "--steps", str(args.steps)], capture_output=True, text=True)
            if child.returncode:
                raise SystemExit(f"{mode} failed:\n{child.stderr[-3000:]}")
            results[mode].append(json.loads(child.stdout.strip().splitlines()[-1]))
    print(f"rank-16 LoRA, batch 2, AdamW, {args.steps} steps (median after {WARMUP} warm-up), CPU, fresh process each")
    print(f"{'loop':<40}{'s/step (runs)':>24}{'peak RSS GiB':>14}")
    summary = {}
    for mode, label in (("bare", "bare PyTorch, data in memory"), ("ours", "chroma_pipeline.training.train_lora")):
        per_step = [r["per_step"] for r in results[mode]]
        summary[mode] = min(per_step)
        runs = ", ".join(f"{x:.3f}" for x in per_step)
        print(f"{label:<40}{runs:>24}{max(r['peak_rss'] for r in results[mode]) / 2**30:>14.2f}")
    print(f"\noverhead of our loop: {100 * (summary['ours'] / summary['bare'] - 1):+.1f}% (best of each; goal < 5%)")


if __name__ == "__main__":
    main()
