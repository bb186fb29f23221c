"""Step `lora_adapter`: a LoRA trained on the cached latents and embeddings, on the saved base model.

`plan_adapter` is the one place that decides which adapter the current data and settings
call for (its key and folder); training, the grid and the checks all ask it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from . import grid, models, training
from .config import ChromaConfig
from .databackend import dataset_of
from .device import DeviceInfo
from .grid import VALIDATION_SETTINGS, make_pipeline, progress_strip, stack
from .latents import read_latent_index
from .layout import Layout, StepResult
from .lora import target_modules
from .memory import check_fits
from .quantized_base import base_model_key, decided_precision, load_base_transformer, precision_estimates
from .report import JsonValue, PathValue, image_markdown, loss_curve
from .storage import combine_hashes, read_columns, write_json_atomic
from .text_embeddings import cached_prompts

SETTINGS = ("output_dir", *training.TRAINING_SETTINGS)
# Presets whose modules changed to match SimpleTuner's Chroma code; their adapters' keys name the modules.
PRESETS_NOW_SIMPLETUNERS = ("tiny", "nano")
WEIGHTS = "pytorch_lora_weights.safetensors"


@dataclass(frozen=True)
class AdapterPlan:
    key: str
    folder: Path
    samples: list
    empty_key: str

    @property
    def weights(self) -> Path:
        return self.folder / WEIGHTS

    @property
    def trained(self) -> bool:
        return self.weights.is_file() and (self.folder / "loss_history.json").is_file()


def training_samples(layout: Layout, named_datasets: bool = False) -> tuple[list[training.TrainingSample], str]:
    """Pair every cached latent with its caption's cached embedding; returns (samples, empty caption key).

    `named_datasets`: sample paths start with their dataset's id (a dataloader file is in use).
    """
    # The two indexes, not the live manifest: a scan that lands mid-run cannot pair a latent
    # with a caption its cache never saw. Each index records the files it was built from.
    latents = {e.path: e for e in read_latent_index(layout.latent_index)}
    # Three columns of the text index, not its rows: the texts themselves are not needed here.
    texts = read_columns(layout.embedding_index, ["role", "path", "cache_key"], "text_embeddings")
    roles, paths, keys = texts["role"], texts["path"], texts["cache_key"]
    captions = {path: key for role, path, key in zip(roles, paths, keys, strict=True) if role == "caption"}
    empty_keys = [key for role, key in zip(roles, keys, strict=True) if role == "empty"]
    if latents.keys() != captions.keys() or not empty_keys:
        only_images = sorted(latents.keys() - captions.keys())[:3]
        only_captions = sorted(captions.keys() - latents.keys())[:3]
        raise RuntimeError(
            "image_latents and text_embeddings were built from different scans of the dataset "
            f"(only in latents: {only_images}, only in embeddings: {only_captions}); re-materialize whichever is "
            "unsynced in Dagster (the automation sensor does it on its own)"
        )
    samples = [training.TrainingSample(latents[path], captions[path], dataset_of(path, named_datasets)[0])
               for path in sorted(latents)]
    return samples, empty_keys[0]


def plan_adapter(config: ChromaConfig, layout: Layout, device: DeviceInfo) -> AdapterPlan:
    """Which adapter the current data and settings call for: the (latent, caption) pairs it trains on,
    the base model and the training settings. Validation prompts are not part of it: changing them
    re-renders the grid, never retrains."""
    samples, empty_key = training_samples(layout, config.named_datasets)
    pairs = sorted(f"{s.latent.cache_key}:{s.embedding_key}" for s in samples)
    start = models.weights_digest(Path(config.init_lora)) if config.init_lora else ""  # its content, not its name
    key_parts = [*pairs, empty_key, base_model_key(config, layout, device), start,
                 config.settings_hash(*training.TRAINING_SETTINGS)]
    if config.flux_lora_target in PRESETS_NOW_SIMPLETUNERS:  # same name, other modules than before: retrain
        model_dir = models.resolve_model_dir(config, layout.models_dir)
        single_layers = json.loads((model_dir / "transformer" / "config.json").read_text())["num_single_layers"]
        key_parts.append(target_modules(config.flux_lora_target, single_layers))
    key = combine_hashes(*key_parts)
    return AdapterPlan(key, layout.adapter_dir(key), samples, empty_key)


def read_trained(plan: AdapterPlan) -> StepResult:
    """The result of the run that trained this adapter, from the files it left."""
    folder = plan.folder
    losses = json.loads((folder / "loss_history.json").read_text())
    held_out, summary = folder / "validation_loss.json", folder / "training.json"
    validation = json.loads(held_out.read_text()) if held_out.is_file() else []
    trained = json.loads(summary.read_text()) if summary.is_file() else {}
    return StepResult(plan.key, plan.weights, {**trained, "steps": len(losses), "losses": losses,
                                               "validation_losses": validation, "reused": True})


def build_adapter(config: ChromaConfig, layout: Layout, device: DeviceInfo, log=print,
                  progress_bar: bool = False) -> StepResult:
    plan = plan_adapter(config, layout, device)
    if plan.trained:
        log(f"reusing trained adapter {plan.folder}: same data, base model and settings")
        return read_trained(plan)

    model_dir = models.resolve_model_dir(config, layout.models_dir)
    precision, _reason = decided_precision(config, layout, model_dir, device)
    needs = precision_estimates(config, model_dir, device, layout)[precision]
    log(f"training at {precision}: {needs.describe()}")
    check_fits(needs.training_device, device.free_memory_bytes(), f"training a rank-{config.network_rank} LoRA at {precision}",
               "Use base_model_precision 'auto' or a smaller one, gradient_checkpointing true, train_batch_size 1, or a "
               "lower resolution.")
    transformer = load_base_transformer(config, layout, device, precision)
    device.reset_peak_memory()
    result = training.train_lora(
        config, transformer, plan.samples, plan.empty_key, layout.latent_dir, layout.embedding_dir,
        vae_config=models.vae_config(model_dir), text_width=models.text_width(model_dir), output_dir=plan.folder,
        device=device, log=log, render_progress=_progress_renderer(config, layout, model_dir, device, log),
        checkpoint_dir=layout.checkpoint_dir(plan.key), progress_bar=progress_bar,
    )
    if (plan.folder / "progress").is_dir():  # which prompts and settings the strips show
        write_json_atomic(plan.folder / "progress" / "settings.json", {"validation": config.settings_hash(*VALIDATION_SETTINGS)})
    stats = {
        "steps": result.steps, "losses": result.losses, "seconds": result.seconds,
        "trainable_parameters": result.trainable_parameters, "peak_memory_bytes": device.peak_memory_bytes(),
        "reused": False, **result.extra,
    }
    return StepResult(plan.key, plan.weights, stats)


def _progress_renderer(config: ChromaConfig, layout: Layout, model_dir: Path, device: DeviceInfo, log):
    """Renders the validation prompts with the LoRA being trained; the VAE loads at the first render."""
    if not config.validation_every:
        return None
    try:
        prompts, embeddings, negative, _keys = cached_prompts(config, layout)
    except RuntimeError as exc:
        log(f"no progress renders during training: {exc}")
        return None
    pipes = {}

    def render_at(transformer, step: int):
        if "pipe" not in pipes:
            vae = models.load_vae(model_dir, device.compute_dtype(config.mixed_precision)).to(device.torch_device)
            pipes["pipe"] = make_pipeline(transformer, vae, models.load_scheduler(model_dir))
            pipes["pipe"].set_progress_bar_config(disable=True)
        log(f"step {step}: rendering {len(prompts)} validation prompts x {len(config.validation_seeds)} seeds")
        cells = grid.render(
            pipes["pipe"], f"step {step}", prompts=prompts, embeddings=embeddings, negative=negative,
            seeds=config.validation_seeds, guidance=config.validation_guidance_real,
            steps=config.validation_num_inference_steps, size=config.validation_size, device=device.torch_device,
        )
        return progress_strip(cells, step)

    return render_at


def adapter_report(result: StepResult) -> dict:
    """What the UI shows for an adapter: the same whether it was trained here, reused, or reported by a worker."""
    from PIL import Image

    stats = result.stats
    losses = stats["losses"]
    tail = losses[-max(1, len(losses) // 10):]
    report = {
        "steps": stats["steps"],
        "final loss": float(losses[-1]),
        "smoothed final loss": float(sum(tail) / len(tail)),
        "retrained": not stats["reused"],
        "loss curve": image_markdown(loss_curve(losses, stats.get("validation_losses")), "loss curve"),
        "adapter": PathValue(str(result.path)),
    }
    validation = stats.get("validation_losses") or []
    if validation:
        report["validation loss"] = float(validation[-1][1])  # plotted across materializations by the UI
        report["validation loss at step"] = int(validation[-1][0])
    strips = sorted(result.path.parent.glob("progress/step_*.png"))
    if strips:
        report["progress"] = image_markdown(stack([Image.open(p).convert("RGB") for p in strips]), "progress")
    # From this run's training, or from training.json when the adapter was trained before.
    if "trainable_parameters" in stats:
        report["trainable parameters"] = stats["trainable_parameters"]
    if "seconds" in stats:
        report["wall seconds"] = round(stats["seconds"] or 0, 1)
    if "resumed_from" in stats:
        report["resumed from step"] = stats["resumed_from"] or 0
    if not stats["reused"] and "peak_memory_bytes" in stats:
        report["peak memory GiB"] = round(stats["peak_memory_bytes"] / 2**30, 3)
    if stats.get("samples_per_epoch"):
        report["samples per epoch"] = JsonValue({d or "instance_data_dir": n for d, n in stats["samples_per_epoch"].items()})
    if "processes" in stats:
        report["training processes"] = stats["processes"]
        report["samples per rank"] = JsonValue(stats["samples_per_rank"])
    return report
