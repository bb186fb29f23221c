"""Train the `toy` flavour's VAE and transformer on generated captioned pictures, on a CPU.

    nice -n 19 python -m chroma_pipeline.toy_training --out chroma_pipeline/toy_weights --seed 0 --threads 1

Measured on one thread of the 2-core CPU machine, at nice 19 beside other work: VAE 560 s (1800
steps), transformer 1523 s (3600 steps, 0.42 s/step), the rest under 30 s: about 35 min. The
committed VAE is that command's, byte for byte; the committed transformer was trained on it with
`--vae chroma_pipeline/toy_weights/vae` added, which loads the VAE instead of training it.

It writes vae/ and transformer/ (fp16 safetensors + config.json), text_encoder/ (the tiny
flavour's random-initialised T5, copied as it is: a fixed text encoder) and training.json (every
metric it prints), then builds the folder with toy.py and renders held-out prompts through
diffusers' ChromaPipeline. Last it prints the WEIGHT_SHA256 table toy.py must hold for these
files, and whether it already does: the same seed, torch version and thread count give the
same bytes.

- VAE: Flux's shape (4 levels, 8x down, 16 latent channels) at a fraction of the width, without
  the mid-block attention, so it is purely convolutional and small random crops teach it pictures
  of any size. MSE plus a small KL. Flux's latents are normalised as (z - shift) * scaling with
  shift the latents' mean and scaling 1 / their std; the same is measured here on its own latents.
- Transformer: from scratch at 64 px (8x8 latents, 4x4 image tokens), with flow.py's rules
  (sigmas, noisy latents, target = noise - latents, the mask over T5's padding) exactly as LoRA
  training uses them, on the posterior samples of the committed (fp16-rounded) VAE. One caption
  in ten is swapped for the empty prompt, so classifier-free guidance has an unconditional model.
- Held out: some (colour, shape, background) combinations never appear in training; rendering
  them shows whether the model composes colours from the words rather than recalling pictures.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .demo_data import COLOURS, SHAPES, draw_picture
from .flow import add_noise, flow_target, image_position_ids, pack_latents, predict_velocity, sample_sigmas
from .latents import scale_latents
from .text import encode_prompts
from .tiny import build_tiny_chroma
from .toy import TOY_RESOLUTION, WEIGHT_SHA256, assemble, weight_sha256
from .toy_metrics import colours_match, psnr

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[8, 16, 32, 32],
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=4,
    sample_size=TOY_RESOLUTION,
    mid_block_add_attention=False,
    use_quant_conv=False,
    use_post_quant_conv=False,
)

TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=64,  # 16 latent channels packed 2x2
    num_layers=2,
    num_single_layers=4,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=32,  # the tiny T5's d_model
    axes_dims_rope=(8, 12, 12),  # sums to attention_head_dim
    approximator_num_channels=64,
    approximator_hidden_dim=128,
    approximator_layers=2,
)

# Only shapes with a background all around them: stripes reach the border, which the colour metric reads.
EVAL_SHAPES = ("circle", "square", "triangle")
HELD_OUT_COUNT = 16
TEST_PROMPT = ("red", "circle", "blue")  # tests/test_toy.py renders it: keep it a training combination
MAX_LENGTH = 16  # every caption fits (12 positions at most); the Chroma mask makes a longer padding change nothing but time
CAPTION_DROPOUT = 0.1
EVAL_STEPS = 20
EVAL_GUIDANCE = (1.0, 4.0)


def log(message: str) -> None:
    print(message, flush=True)


def held_out_combos(seed: int) -> list[tuple[str, str, str]]:
    combos = [(fg, shape, bg) for fg in COLOURS for shape in EVAL_SHAPES for bg in COLOURS if fg != bg]
    combos.remove(TEST_PROMPT)
    return sorted(random.Random(f"held-out-{seed}").sample(combos, HELD_OUT_COUNT))


def caption_of(fg: str, shape: str, bg: str) -> str:
    subject = f"{fg} stripes" if shape == "stripes" else f"a {fg} {shape}"
    return f"{subject} on a {bg} background"


def to_pixels(images: list[Image.Image]) -> torch.Tensor:
    """PIL pictures -> (B, 3, H, W) in [-1, 1], what diffusers' VAEs take."""
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1


def to_images(pixels: torch.Tensor) -> list[Image.Image]:
    array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in array]


def round_to_fp16(model: torch.nn.Module) -> None:
    """Measure and train on what is committed: the fp16 copy, read back as fp32."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.half().float())


def cosine_lr(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


# --- VAE ------------------------------------------------------------------------------------------
# Each step holds about as many pixels whatever the crop, so a step costs the same at every size.
CROPS = ((32, 48), (32, 48), (48, 21), (64, 12))  # (crop side, batch)


def crop_batch(rng: random.Random, side: int, batch: int) -> torch.Tensor:
    """Random crops of pictures drawn between 1x and 4x the crop: edges, flat areas and whole shapes."""
    crops = []
    for _ in range(batch):
        size = rng.randint(side, min(4 * side, 256))
        image, _ = draw_picture(rng, size)
        x, y = rng.randint(0, size - side), rng.randint(0, size - side)
        crops.append(image.crop((x, y, x + side, y + side)))
    return to_pixels(crops)


def train_vae(seed: int, steps: int, lr: float = 2e-3, kl_weight: float = 1e-5):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    # A random encoder's posterior has std ~1, which drowns the latents and leaves the decoder
    # nothing to learn from; starting it narrow (std ~0.02) lets reconstruction learn from step one.
    with torch.no_grad():
        vae.encoder.conv_out.bias[VAE_CONFIG["latent_channels"]:] = -8.0
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_lr(step, steps, warmup=min(50, steps)))
    rng = random.Random(f"vae-{seed}")
    started, running = time.time(), []
    for step in range(steps):
        side, batch = CROPS[step % len(CROPS)]
        pixels = crop_batch(rng, side, batch)
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        mse = F.mse_loss(reconstruction, pixels)
        kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
        loss = mse + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        running.append(mse.item())
        if (step + 1) % 50 == 0 or step + 1 == steps:
            mean_mse = sum(running) / len(running)
            log(f"vae step {step + 1}/{steps}: mse {mean_mse:.4f} ({10 * math.log10(4 / mean_mse):.1f} dB on crops), "
                f"kl {kl.item():.2f}, {time.time() - started:.0f} s")
            running.clear()
    vae.eval()
    round_to_fp16(vae)
    return vae


@torch.no_grad()
def vae_psnr(vae, seed: int, sizes=(64, 128, 256), count: int = 16) -> dict[str, float]:
    """Mean reconstruction PSNR on pictures drawn from a seed training never used."""
    rng = random.Random(f"vae-held-out-{seed}")
    result = {}
    for size in sizes:
        images = [draw_picture(rng, size)[0] for _ in range(count)]
        reconstructed = []
        for start in range(0, count, 8):  # 8 at a time keeps 256 px decodes small
            pixels = to_pixels(images[start:start + 8])
            reconstructed += to_images(vae.decode(vae.encode(pixels).latent_dist.mode()).sample)
        result[str(size)] = round(float(np.mean([psnr(a, b) for a, b in zip(images, reconstructed, strict=True)])), 2)
    return result


@torch.no_grad()
def set_latent_factors(vae, seed: int, count: int = 256) -> None:
    """Flux's normalisation measured on this VAE: shift = mean of its latents, scaling = 1 / their std."""
    rng = random.Random(f"vae-factors-{seed}")
    pixels = to_pixels([draw_picture(rng, TOY_RESOLUTION)[0] for _ in range(count)])
    latents = vae.encode(pixels).latent_dist.sample(generator=torch.Generator().manual_seed(seed))
    vae.register_to_config(shift_factor=round(latents.mean().item(), 4), scaling_factor=round(1 / latents.std().item(), 4))


# --- transformer ---------------------------------------------------------------------------------
@torch.no_grad()
def transformer_dataset(vae, tokenizer, text_encoder, seed: int, count: int, held_out: list):
    """Posterior (mean, std) per picture and the T5 embedding of each distinct caption, encoded once."""
    held = set(held_out)
    combos = [(fg, shape, bg) for fg in COLOURS for shape in SHAPES for bg in COLOURS
              if fg != bg and (fg, shape, bg) not in held]
    rng = random.Random(f"transformer-{seed}")
    captions, caption_ids, means, stds = [], [], [], []
    index: dict[str, int] = {}
    for start in range(0, count, 64):
        images = []
        for _ in range(min(64, count - start)):
            fg, shape, bg = rng.choice(combos)
            image, caption = draw_picture(rng, TOY_RESOLUTION, fg, shape, bg)
            images.append(image)
            caption_ids.append(index.setdefault(caption, len(index)))
        posterior = vae.encode(to_pixels(images)).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    captions = sorted(index, key=index.get)
    prompt_embeds, masks = encode_prompts(captions + [""], tokenizer, text_encoder, MAX_LENGTH, "unmodified", "cpu",
                                          torch.float32)
    return dict(mean=torch.cat(means), std=torch.cat(stds), caption_ids=torch.tensor(caption_ids),
                prompt_embeds=prompt_embeds[:-1], masks=masks[:-1], empty_embeds=prompt_embeds[-1], empty_mask=masks[-1],
                captions=captions)


def train_transformer(data: dict, vae_config: dict, seed: int, steps: int, batch: int = 64, lr: float = 1e-3):
    from diffusers import ChromaTransformer2DModel

    torch.manual_seed(seed)
    transformer = ChromaTransformer2DModel(**TRANSFORMER_CONFIG)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_lr(step, steps, warmup=min(100, steps)))
    generator = torch.Generator().manual_seed(seed)
    latent_side = TOY_RESOLUTION // 8
    image_ids = image_position_ids(latent_side, latent_side)
    started, running = time.time(), []
    for step in range(steps):
        picked = torch.randint(len(data["mean"]), (batch,), generator=generator)
        # A fresh draw from the VAE posterior each step, as batches.load_batch does.
        eps = torch.randn(data["std"][picked].shape, generator=generator)
        x0 = scale_latents(data["mean"][picked] + data["std"][picked] * eps,
                           vae_config["shift_factor"], vae_config["scaling_factor"])
        captions = data["caption_ids"][picked]
        prompt_embeds, text_mask = data["prompt_embeds"][captions].clone(), data["masks"][captions].clone()
        drop = torch.rand(batch, generator=generator) < CAPTION_DROPOUT
        prompt_embeds[drop], text_mask[drop] = data["empty_embeds"], data["empty_mask"]

        latents = pack_latents(x0)
        noise = torch.randn(latents.shape, generator=generator)
        sigmas = sample_sigmas(batch, generator)
        velocity = predict_velocity(transformer, add_noise(latents, noise, sigmas), sigmas, prompt_embeds, text_mask,
                                    image_ids)
        loss = F.mse_loss(velocity, flow_target(latents, noise))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        running.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log(f"transformer step {step + 1}/{steps}: loss {sum(running) / len(running):.4f}, "
                f"{time.time() - started:.0f} s")
            running.clear()
    transformer.eval()
    round_to_fp16(transformer)
    return transformer


# --- rendering held-out prompts ------------------------------------------------------------------
def render(model_dir: Path, prompts: list[str], seeds: list[int], guidance: float, steps: int = EVAL_STEPS):
    """Each prompt at each seed through diffusers' ChromaPipeline, loaded from the built folder."""
    from diffusers import ChromaPipeline

    pipe = ChromaPipeline.from_pretrained(model_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    all_prompts = [p for p in prompts for _ in seeds]
    generators = [torch.Generator().manual_seed(s) for _ in prompts for s in seeds]
    return pipe(prompt=all_prompts, height=TOY_RESOLUTION, width=TOY_RESOLUTION, num_inference_steps=steps,
                guidance_scale=guidance, generator=generators, max_sequence_length=MAX_LENGTH).images


def colour_accuracy(model_dir: Path, combos: list, seeds: list[int], guidance: float, samples: Path | None = None):
    images = render(model_dir, [caption_of(*c) for c in combos], seeds, guidance)
    # images come prompt by prompt, each at every seed
    checks = [colours_match(image, fg, bg) for image, (fg, _, bg) in zip(images, (c for c in combos for _ in seeds), strict=True)]
    if samples is not None:
        grid = Image.new("RGB", (TOY_RESOLUTION * len(seeds), TOY_RESOLUTION * len(combos)))
        for k, image in enumerate(images):
            grid.paste(image, ((k % len(seeds)) * TOY_RESOLUTION, (k // len(seeds)) * TOY_RESOLUTION))
        grid.save(samples)
    count = len(checks)
    return {
        "foreground": round(sum(c["foreground"] for c in checks) / count, 3),
        "background": round(sum(c["background"] for c in checks) / count, 3),
        "both": round(sum(c["foreground"] and c["background"] for c in checks) / count, 3),
        "renders": count,
    }


def drop_load_path(config_path: Path) -> None:
    """A VAE read back with --vae records where it came from; without that key its config.json is
    byte for byte the one a full run writes (diffusers' own format: sorted keys, 2-space indent)."""
    config = json.loads(config_path.read_text())
    if config.pop("_name_or_path", None) is not None:
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# --- the whole run --------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "toy_weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=1800)
    parser.add_argument("--transformer-steps", type=int, default=3600)
    parser.add_argument("--pictures", type=int, default=4096, help="captioned pictures the transformer trains on")
    parser.add_argument("--samples", type=Path, help="also save the held-out renders as one PNG here")
    parser.add_argument("--vae", type=Path, help="a VAE folder this script wrote before: train only the transformer")
    # On cores other work also uses, one thread is faster than two: every op waits for the slower thread.
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started_wall, started_cpu = time.time(), time.process_time()
    timings = {}

    def lap(name: str, since: float) -> float:
        timings[name] = round(time.time() - since, 1)
        return time.time()

    from transformers import T5EncoderModel, T5TokenizerFast

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        tiny = build_tiny_chroma(Path(scratch) / "tiny")
        shutil.rmtree(out / "text_encoder", ignore_errors=True)
        shutil.copytree(tiny / "text_encoder", out / "text_encoder")
        tokenizer = T5TokenizerFast.from_pretrained(tiny / "tokenizer")
    text_encoder = T5EncoderModel.from_pretrained(out / "text_encoder", use_safetensors=True).eval()

    mark = time.time()
    if args.vae:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae, torch_dtype=torch.float32, use_safetensors=True).eval()
    else:
        vae = train_vae(args.seed, args.vae_steps)
    mark = lap("vae_training_s", mark)
    set_latent_factors(vae, args.seed)
    vae_metrics = {"psnr_db": vae_psnr(vae, args.seed), "shift_factor": vae.config.shift_factor,
                   "scaling_factor": vae.config.scaling_factor}
    log(f"VAE held-out PSNR (dB) by size: {vae_metrics['psnr_db']}; shift_factor {vae.config.shift_factor}, "
        f"scaling_factor {vae.config.scaling_factor}")
    vae.to(torch.float16).save_pretrained(out / "vae", safe_serialization=True)
    drop_load_path(out / "vae" / "config.json")
    vae.to(torch.float32)
    mark = lap("vae_eval_s", mark)

    held_out = held_out_combos(args.seed)
    data = transformer_dataset(vae, tokenizer, text_encoder, args.seed, args.pictures, held_out)
    log(f"transformer data: {len(data['mean'])} pictures, {len(data['captions'])} distinct captions, "
        f"{len(held_out)} combinations held out")
    mark = lap("transformer_data_s", mark)
    transformer = train_transformer(data, dict(vae.config), args.seed, args.transformer_steps)
    transformer.to(torch.float16).save_pretrained(out / "transformer", safe_serialization=True)
    mark = lap("transformer_training_s", mark)

    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(scratch) / "toy"
        model_dir.mkdir()
        assemble(model_dir, out, WEIGHT_SHA256)
        seeds = [1, 2]
        accuracy = {}
        for guidance in EVAL_GUIDANCE:
            samples = args.samples.with_name(f"{args.samples.stem}-cfg{guidance:g}.png") if args.samples else None
            accuracy[f"guidance_{guidance:g}"] = colour_accuracy(model_dir, held_out, seeds, guidance, samples)
            log(f"held-out prompts at guidance {guidance:g}: {accuracy[f'guidance_{guidance:g}']}")
    lap("render_eval_s", mark)

    digests = weight_sha256(out)
    weights_bytes = sum((out / name).stat().st_size for name in digests)
    metrics = {
        "seed": args.seed, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "steps": {"vae": args.vae_steps, "transformer": args.transformer_steps, "pictures": args.pictures},
        "vae": vae_metrics, "vae_source": str(args.vae) if args.vae else "trained",
        "held_out_combos": [caption_of(*c) for c in held_out], "held_out_colours": accuracy,
        "timings_s": timings, "wall_s": round(time.time() - started_wall, 1),
        "cpu_s": round(time.process_time() - started_cpu, 1), "weights_bytes": weights_bytes, "sha256": digests,
    }
    (out / "training.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log(f"wall {metrics['wall_s']} s, cpu {metrics['cpu_s']} s; weights {weights_bytes / 2**20:.1f} MiB; "
        f"timings {timings}")
    if digests == WEIGHT_SHA256:
        log("the files match toy.py's WEIGHT_SHA256: this run reproduced the committed weights")
    else:
        log("the files differ from toy.py's WEIGHT_SHA256; if they are to be committed, set it to:")
        log("WEIGHT_SHA256 = " + json.dumps(digests, indent=4).replace("\n}", ",\n}"))
    return metrics


if __name__ == "__main__":
    main()
