"""LoRA training on cached latents and embeddings: one loop, the Chroma math in plain sight.

The loop is written on accelerate's `Accelerator`, as diffusers' training examples are:
one process, N processes (`accelerate launch`, DDP) and N machines run the same code.
`lora_adapter` calls `train_lora` in-process, or launches `python -m chroma_pipeline.train`.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from .batches import (
    Prefetched,
    TrainingSample,
    batch_generator,
    bucket_batches,
    dataset_probability,
    dataset_repeats,
    load_batch,
    samples_per_epoch,
    total_steps,
)
from .checkpoints import newest_usable, restore_checkpoint, save_checkpoint
from .config import ChromaConfig
from .device import DeviceInfo
from .distributed import StopRequest, TrainingStopped, any_rank, keep_frozen_weights_out_of_ddp, make_accelerator
from .errors import DeviceUnavailable
from .flow import add_noise, flow_target, image_position_ids, pack_latents, predict_velocity, sample_sigmas
from .held_out import held_out_loss, split_held_out
from .lora import load_initial_adapter, lora_config, save_adapter
from .shards import ShardStore
from .storage import atomic_dir
from .text import load_embedding

# The settings that decide what training produces (and so the adapter's key).
TRAINING_SETTINGS = (
    "network_rank", "lora_alpha", "flux_lora_target", "learning_rate", "lr_scheduler", "lr_warmup_steps",
    "max_grad_norm", "grad_clip_method", "flow_schedule_shift", "train_batch_size", "gradient_accumulation_steps",
    "max_train_steps", "mixed_precision", "seed", "caption_dropout_probability", "validation_loss_share", "lora_dropout",
    "init_lora", "num_train_epochs", "repeats", "optimizer", "adam_weight_decay", "num_processes", "num_machines",
    "dataset_mix", "data_backend_sampling",
)


@dataclass
class TrainingResult:
    adapter_path: Path
    losses: list[float]
    steps: int
    seconds: float
    trainable_parameters: int
    extra: dict = field(default_factory=dict)


def make_optimizer(config: ChromaConfig, parameters, device: torch.device):
    if config.optimizer == "adamw8bit":
        if torch.device(device).type != "cuda":
            raise DeviceUnavailable(
                f"optimizer 'adamw8bit' needs bitsandbytes on a CUDA or ROCm GPU, and this run is on {device}; "
                "use 'adamw' (or 'adafactor' for less optimizer memory)"
            )
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(parameters, lr=config.learning_rate, weight_decay=config.adam_weight_decay)
    if config.optimizer == "adafactor":
        return torch.optim.Adafactor(parameters, lr=config.learning_rate, weight_decay=config.adam_weight_decay)
    return torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.adam_weight_decay)


def _memory_in_use(device: torch.device) -> str:
    if device.type == "cuda":
        return f"peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
    import psutil

    return f"RSS {psutil.Process().memory_info().rss / 2**30:.1f} GiB"


def train_lora(
    config: ChromaConfig,
    transformer,
    samples: list[TrainingSample],
    empty_embedding_key: str,
    latent_dir: Path,
    embedding_dir: Path,
    vae_config,
    text_width: int,
    output_dir: Path,
    device: DeviceInfo,
    log=print,
    log_every: int = 10,
    render_progress=None,
    checkpoint_dir: Path | None = None,
    progress_bar: bool = False,
) -> TrainingResult:
    """Train a LoRA on `transformer` (quantized or not) and write it to `output_dir` atomically.

    `render_progress(transformer, step)`, when given, is called every `validation_steps`
    and returns a picture of the validation prompts at that step (saved under progress/).
    With `checkpoint_dir`, a checkpoint is written every `checkpointing_steps`, and a run
    that finds one there continues from the newest that verifies. Under `accelerate launch`
    each rank trains on its own batches and DDP averages the gradients; rank 0 alone logs,
    evaluates, renders, checkpoints and writes the adapter. SIGTERM finishes the step,
    writes a checkpoint and raises `TrainingStopped`.
    """
    from accelerate.utils import gather_object
    from diffusers.optimization import get_scheduler

    if not samples:
        raise ValueError("no training samples: the dataset manifest has no usable images")
    dtype = device.compute_dtype(config.mixed_precision)
    accelerator = make_accelerator(device, dtype, config.gradient_accumulation_steps)
    world, rank = accelerator.num_processes, accelerator.process_index
    on_device = accelerator.device
    if not accelerator.is_main_process:
        log = _quiet

    torch.manual_seed(config.seed)  # the same LoRA initialisation on every rank
    transformer.requires_grad_(False)
    transformer.add_adapter(
        lora_config(config.network_rank, config.lora_alpha_value, config.flux_lora_target,
                    transformer.config.num_single_layers, dropout=config.lora_dropout)
    )
    if config.init_lora:
        log(f"starting from {config.init_lora}: {load_initial_adapter(transformer, Path(config.init_lora))} tensors")
    torch.manual_seed(config.seed + rank)  # LoRA dropout masks of their own on each rank
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    for p in trainable:
        p.data = p.data.float()  # LoRA weights train in fp32 even when the base computes in bf16/fp16
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    keep_frozen_weights_out_of_ddp(transformer)
    optimizer = make_optimizer(config, trainable, on_device)
    # `model` is what the loop calls (DDP-wrapped under `accelerate launch`); `transformer` stays the
    # plain module for evaluation, checkpoints and saving. Both share the same weights.
    model, optimizer = accelerator.prepare(transformer, optimizer)

    samples, held = split_held_out(samples, config.validation_loss_share, config.seed)
    if held:
        log(f"{len(held)} of {len(samples) + len(held)} samples held out for the validation loss")
    steps = total_steps(config, samples, world)
    per_epoch = samples_per_epoch(samples, dataset_repeats(config))
    log("samples per epoch (with repeats): " + ", ".join(f"{d or 'dataset'} {n}" for d, n in per_epoch.items()))
    # Not prepared: accelerate would step it once per process; ours counts optimizer steps.
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                                 num_training_steps=steps)
    batches = bucket_batches(samples, config.train_batch_size, config.seed, dataset_repeats(config),
                             dataset_probability(config, samples))
    load = dict(
        samples=samples, latent_store=ShardStore(latent_dir), embedding_dir=embedding_dir, vae_config=vae_config,
        text_width=text_width, max_length=config.tokenizer_max_length, device=on_device, dtype=dtype,
    )
    empty = load_embedding(embedding_dir, empty_embedding_key, config.tokenizer_max_length, text_width)
    if empty is None and config.caption_dropout_probability > 0:
        raise RuntimeError("the empty-caption embedding (for caption dropout) is missing: re-materialize text_embeddings")

    losses: list[float] = []
    validation_losses: list[list] = []  # [step, held-out loss]
    progress = {}
    first_step, drawn, resumed_from = 1, 0, None
    live = dict(transformer=transformer, optimizer=optimizer, scheduler=lr_scheduler, scaler=accelerator.scaler)
    checkpoint = newest_usable(checkpoint_dir, warn=log) if checkpoint_dir else None
    if checkpoint is not None:
        state = restore_checkpoint(checkpoint, **live)
        losses, resumed_from = state["losses"], state["step"]
        validation_losses = state.get("validation_losses", [])
        first_step, drawn = state["step"] + 1, state["batches_drawn"]
        for _ in range(drawn):  # the sampler continues where it was, mid-epoch included
            next(batches)
        for path in sorted((checkpoint / "progress").glob("step_*.png")):
            progress[int(path.stem.split("_")[1])] = Image.open(path).convert("RGB")
        log(f"resuming from checkpoint {checkpoint.name}: step {resumed_from} of {steps} done")
        if rank:  # the checkpoint holds rank 0's global RNG (LoRA dropout); the others need their own
            torch.manual_seed(config.seed + rank + 1_000_003 * resumed_from)
    def batches_of_this_rank(first_draw: int):
        """(batch, its generator, its tensors) in order: every rank draws the same `world` batches
        from the shared order and trains on its own."""
        draw = first_draw
        while True:
            batch = [next(batches) for _ in range(world)][rank]
            generator = batch_generator(config.seed, draw + rank)
            draw += world
            yield batch, generator, load_batch(batch, **load, generator=generator)

    started = time.perf_counter()
    seen = 0
    unread_losses: list[tuple[int, torch.Tensor]] = []  # (step, loss) still on the device: read every log_every steps

    def read_losses() -> None:
        """Bring the pending losses to the host (one sync for several steps) and stop on the first non-finite one."""
        if not unread_losses:
            return
        values = accelerator.reduce(torch.stack([loss for _, loss in unread_losses]), reduction="mean").tolist()
        for (at_step, _), value in zip(unread_losses, values, strict=True):
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"loss became {value} at step {at_step}: lower learning_rate (now {config.learning_rate}) "
                    "or use mixed_precision bf16 instead of fp16"
                )
        losses.extend(values)
        unread_losses.clear()

    bar = tqdm(total=steps, initial=first_step - 1, unit="step", disable=not (progress_bar and accelerator.is_main_process))
    loader = Prefetched(batches_of_this_rank(drawn))
    with StopRequest() as stop, contextlib.closing(loader):
        for step in range(first_step, steps + 1):
            step_loss = torch.zeros((), device=on_device)
            for _ in range(config.gradient_accumulation_steps):
                batch, generator, (x0, prompt_embeds, text_mask) = next(loader)
                drawn += world
                seen += len(batch)
                if config.caption_dropout_probability > 0:
                    drop = torch.rand(x0.shape[0], generator=generator) < config.caption_dropout_probability
                    prompt_embeds[drop] = empty["prompt_embeds"].to(on_device, dtype)
                    text_mask[drop] = empty["attention_mask"].to(on_device)

                latents = pack_latents(x0)
                noise = torch.randn(latents.shape, generator=generator).to(on_device)
                sigmas = sample_sigmas(latents.shape[0], generator, config.flow_schedule_shift).to(on_device)
                noisy = add_noise(latents, noise, sigmas)
                target = flow_target(latents, noise)
                image_ids = image_position_ids(x0.shape[2], x0.shape[3])

                # accelerate skips DDP's all-reduce, the clip and the optimizer step until the last batch of the step.
                with accelerator.accumulate(model):
                    velocity = predict_velocity(model, noisy.to(dtype), sigmas, prompt_embeds, text_mask, image_ids)
                    loss = F.mse_loss(velocity.float(), target.float())
                    accelerator.backward(loss)  # divides by gradient_accumulation_steps
                    if accelerator.sync_gradients and config.max_grad_norm > 0:
                        if config.grad_clip_method == "value":  # SimpleTuner's default: each element in ±max
                            accelerator.clip_grad_value_(trainable, config.max_grad_norm)
                        else:
                            accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                step_loss += loss.detach() / config.gradient_accumulation_steps
            lr_scheduler.step()
            unread_losses.append((step, step_loss))
            bar.update(1)

            evaluate_now = config.validation_every and step % config.validation_every == 0
            stopping = any_rank(accelerator, stop.requested) and step < steps
            checkpoint_now = (step % config.checkpointing_steps == 0 or stopping) and checkpoint_dir and step < steps
            if step % log_every == 0 or step == steps or evaluate_now or checkpoint_now:
                read_losses()  # the only host sync of the loop
            if step % log_every == 0 or step == steps:
                rate = (step - first_step + 1) / (time.perf_counter() - started)
                log(
                    f"step {step}/{steps} loss {losses[-1]:.4f} lr {lr_scheduler.get_last_lr()[0]:.2e} "
                    f"{rate:.2f} steps/s ETA {(steps - step) / rate:.0f}s {_memory_in_use(on_device)}"
                )
            failure = None
            try:  # rank 0's own work; if it fails, every rank must stop, not wait in the next collective
                if held and accelerator.is_main_process and (evaluate_now or step == steps):
                    transformer.eval()
                    with accelerator.autocast():
                        validation_losses.append([step, held_out_loss(transformer, held, load, config.seed)])
                    transformer.train()
                    log(f"step {step}: validation loss {validation_losses[-1][1]:.4f} on {len(held)} held-out samples")
                if render_progress is not None and accelerator.is_main_process and evaluate_now:
                    transformer.eval()
                    # Under bf16/fp16 `prepare` made the transformer return fp32; autocast keeps the
                    # pipeline's latents in the VAE's dtype, as in training's own forward passes.
                    with torch.no_grad(), accelerator.autocast():
                        progress[step] = render_progress(transformer, step)
                    transformer.train()
                if accelerator.is_main_process and checkpoint_now:
                    save_checkpoint(checkpoint_dir, step, **live, batches_drawn=drawn, losses=losses, progress=progress,
                                    keep_last=config.checkpoints_total_limit,
                                    extra={"validation_losses": validation_losses})
                    log(f"checkpoint saved at step {step}")
            except Exception as exc:  # re-raised below, on every rank
                failure = exc
            if any_rank(accelerator, failure is not None):
                if failure is not None:
                    raise failure
                raise RuntimeError(f"rank 0 failed at step {step}; its log says why")
            if stopping:
                accelerator.wait_for_everyone()
                raise TrainingStopped(f"stopped on request after step {step} (checkpoint saved); run again to resume")
    bar.close()

    transformer.eval()
    output_dir = Path(output_dir)
    seconds = time.perf_counter() - started
    summary = {"steps": steps, "seconds": round(seconds, 2), "trainable_parameters": sum(p.numel() for p in trainable),
               "resumed_from": resumed_from, "processes": world, "samples_per_rank": gather_object([seen]),
               "samples_per_epoch": per_epoch}
    if accelerator.is_main_process:
        with atomic_dir(output_dir) as staging:
            save_adapter(transformer, staging)
            (staging / "loss_history.json").write_text(json.dumps(losses))
            (staging / "validation_loss.json").write_text(json.dumps(validation_losses))
            (staging / "training.json").write_text(json.dumps(summary))
            for render_step, picture in progress.items():
                (staging / "progress").mkdir(exist_ok=True)
                picture.save(staging / "progress" / f"step_{render_step:06d}.png")
    accelerator.wait_for_everyone()  # the adapter exists for every rank once this returns
    return TrainingResult(
        adapter_path=output_dir / "pytorch_lora_weights.safetensors",
        losses=losses,
        steps=steps,
        seconds=seconds,
        trainable_parameters=summary["trainable_parameters"],
        extra={**summary, "validation_losses": validation_losses},
    )


def _quiet(_message: str) -> None:
    """The log of ranks other than 0."""
