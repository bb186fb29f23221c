"""Training overhead: our loop (`chroma_pipeline.training.train_lora`) against a bare PyTorch loop doing the same work.

Both loops do, every step: draw the batch from the bucket sampler, read its latents and
embeddings from the caches, draw the VAE posterior sample, caption dropout, sigmas and noise
from the batch's generator, forward, flow-matching loss, backward, gradient clipping, AdamW,
the LR scheduler; and every 10 steps, one read of the loss and one log line with the RSS.
The bare loop is that and nothing else (no accelerate, no checks, no checkpoint logic);
ours is the production loop as `lora_adapter` runs it. Same data, model, seed and settings:
rank-16 LoRA on "all" targets, batch 2, fp32, 24 generated images at 256 px.

Two model sizes: the `tiny` flavour, and a mid-size random Chroma (Chroma1's block
structure at hidden 512: 2 double + 4 single blocks). Each run is a fresh process; runs
alternate bare, ours, bare, ours, ... The figure is seconds per step after the first 10 steps (they
warm up), over 300 steps on tiny and 60 on mid; reported as the median of the runs with their range, and the ratio
ours / bare per pair of neighbouring runs, median and range.

    python benchmarks/training.py [--steps N] [--runs 5] [--sizes tiny,mid]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MID = dict(num_layers=2, num_single_layers=4, attention_head_dim=128, num_attention_heads=4, axes_dims_rope=[16, 56, 56])
WARMUP, LOG_EVERY = 10, 10
# A tiny step takes ~13 ms, so 30 steps measured ±15% of noise between identical runs; 300 bring it to a few %.
STEPS = {"tiny": 300, "mid": 60}
CACHE_STEPS = ["raw_dataset/images", "raw_dataset/captions", "image_latents", "text_embeddings", "quantized_base_model"]


def prepare(root: Path, size: str) -> Path:
    """A project with the tiny VAE/T5 and a transformer of `size`, caches built; returns its config."""
    from dagster import DagsterInstance
    from diffusers import ChromaTransformer2DModel

    from assets.definitions import materialize_chain
    from chroma_pipeline.demo_data import demo_config, make_demo_dataset
    from chroma_pipeline.tiny import build_tiny_chroma

    tiny = build_tiny_chroma(root / "tiny")
    model = root / f"model-{size}"
    shutil.copytree(tiny, model, symlinks=False, ignore=shutil.ignore_patterns("transformer"))
    config = ChromaTransformer2DModel.load_config(tiny / "transformer")
    torch.manual_seed(0)
    ChromaTransformer2DModel.from_config({**config, **(MID if size == "mid" else {})}).save_pretrained(model / "transformer")
    if not (root / "dataset").is_dir():
        make_demo_dataset(root / "dataset", count=24)
    values = demo_config(root / "dataset", root / f"output-{size}")
    values.update(pretrained_model_name_or_path=str(model), model_flavour="base", base_model_precision="no_change",
                  network_rank=16, lora_alpha=16, flux_lora_target="all", train_batch_size=2, validation_steps=0,
                  validation_loss_share=0, gradient_checkpointing=False, resolution=256, mixed_precision="no",
                  checkpointing_steps=10**6)
    path = root / f"config-{size}.json"
    path.write_text(json.dumps(values))
    assert materialize_chain(str(path), DagsterInstance.ephemeral(), selection=CACHE_STEPS, device="cpu").success
    return path


def bare_loop(config, transformer, samples, empty_key, layout, vae, width, steps: int, log) -> None:
    """The same work as train_lora's step, written out plainly."""
    import psutil
    from diffusers.optimization import get_scheduler

    from chroma_pipeline.batches import batch_generator, bucket_batches, load_batch
    from chroma_pipeline.flow import add_noise, flow_target, image_position_ids, pack_latents, predict_velocity, sample_sigmas
    from chroma_pipeline.lora import lora_config
    from chroma_pipeline.shards import ShardStore
    from chroma_pipeline.text import load_embedding

    torch.manual_seed(config.seed)
    transformer.requires_grad_(False)
    transformer.add_adapter(lora_config(config.network_rank, config.lora_alpha_value, config.flux_lora_target,
                                        transformer.config.num_single_layers))
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.adam_weight_decay)
    scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                              num_training_steps=steps)
    load = dict(samples=samples, latent_store=ShardStore(layout.latent_dir), embedding_dir=layout.embedding_dir,
                vae_config=vae, text_width=width, max_length=config.tokenizer_max_length, device="cpu",
                dtype=torch.float32)
    empty = load_embedding(layout.embedding_dir, empty_key, config.tokenizer_max_length, width)
    batches = bucket_batches(samples, config.train_batch_size, config.seed)
    transformer.train()
    for step in range(1, steps + 1):
        batch = next(batches)
        generator = batch_generator(config.seed, step - 1)
        x0, prompt_embeds, text_mask = load_batch(batch, **load, generator=generator)
        if config.caption_dropout_probability > 0:
            drop = torch.rand(x0.shape[0], generator=generator) < config.caption_dropout_probability
            prompt_embeds[drop], text_mask[drop] = empty["prompt_embeds"], empty["attention_mask"]
        latents = pack_latents(x0)
        noise = torch.randn(latents.shape, generator=generator)
        sigmas = sample_sigmas(latents.shape[0], generator, config.flow_schedule_shift)
        velocity = predict_velocity(transformer, add_noise(latents, noise, sigmas), sigmas, prompt_embeds, text_mask,
                                    image_position_ids(x0.shape[2], x0.shape[3]))
        loss = torch.nn.functional.mse_loss(velocity, flow_target(latents, noise))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if step % LOG_EVERY == 0:
            log(f"step {step}/{steps} loss {loss.item():.4f} RSS {psutil.Process().memory_info().rss / 2**30:.1f} GiB")


def run(mode: str, config_path: Path, steps: int) -> dict:
    """In this process: `steps` steps one way; returns seconds per step after the warm-up."""
    from chroma_pipeline import models
    from chroma_pipeline.config import load_config
    from chroma_pipeline.device import detect_device
    from chroma_pipeline.layout import Layout
    from chroma_pipeline.lora_adapter import training_samples
    from chroma_pipeline.training import train_lora

    config = load_config(config_path, max_train_steps=steps)
    layout = Layout(Path(config.output_dir))
    model_dir = models.resolve_model_dir(config, layout.models_dir)
    samples, empty_key = training_samples(layout)
    vae, width = models.vae_config(model_dir), models.text_width(model_dir)
    transformer = models.load_transformer(model_dir, torch.float32)
    logged: dict[int, float] = {}

    def clock(message: str) -> None:
        if message.startswith("step "):
            logged[int(message.split()[1].split("/")[0])] = time.perf_counter()

    if mode == "ours":
        with tempfile.TemporaryDirectory() as out:
            train_lora(config, transformer, samples, empty_key, layout.latent_dir, layout.embedding_dir, vae, width,
                       Path(out) / "adapter", detect_device("cpu"), log=clock, log_every=LOG_EVERY)
    else:
        bare_loop(config, transformer, samples, empty_key, layout, vae, width, steps, clock)
    return {"per_step": (logged[steps] - logged[WARMUP]) / (steps - WARMUP)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, help=f"steps per run (default: {STEPS})")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sizes", default="tiny,mid")
    parser.add_argument("--mode", choices=["ours", "bare"], help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run(args.mode, args.config, args.steps)))
        return

    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo))
    env = {**os.environ, "PYTHONPATH": str(repo)}
    sizes = args.sizes.split(",")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="chroma-train-bench-") as tmp:
        configs = {size: prepare(Path(tmp), size) for size in sizes}
        results = {size: {"bare": [], "ours": []} for size in sizes}
        for _ in range(args.runs):
            for size in sizes:
                for mode in ("bare", "ours"):
                    child = subprocess.run([sys.executable, __file__, "--mode", mode, "--config", str(configs[size]),
                                            "--steps", str(args.steps or STEPS[size])], capture_output=True, text=True, env=env)
                    if child.returncode:
                        raise SystemExit(f"{mode} failed:\n{child.stderr[-3000:]}")
                    results[size][mode].append(json.loads(child.stdout.strip().splitlines()[-1])["per_step"])

    def spread(values: list[float], unit: str = "") -> str:
        return f"{statistics.median(values):.3f}{unit} ({min(values):.3f}–{max(values):.3f})"

    print(f"rank-16 LoRA on all, batch 2, fp32, 256 px, CPU ({os.cpu_count()} cores), {args.runs} runs each, fresh "
          f"process each, alternating; s/step over steps "
          f"{', '.join(f'{WARMUP + 1}-{args.steps or STEPS[size]} ({size})' for size in sizes)}; load average before "
          f"{load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    print(f"{'model':<8}{'bare s/step':>26}{'ours s/step':>26}{'ours / bare':>26}")
    ratios = {}
    for size in sizes:
        bare, ours = results[size]["bare"], results[size]["ours"]
        ratios[size] = [o / b for o, b in zip(ours, bare, strict=True)]
        print(f"{size:<8}{spread(bare):>26}{spread(ours):>26}{spread(ratios[size], 'x'):>26}")
    print("median ratio ours / bare (range): "
          + ", ".join(f"{size} {spread(ratios[size], 'x')}" for size in sizes) + "; goal ≤ 1.05x")


if __name__ == "__main__":
    main()
