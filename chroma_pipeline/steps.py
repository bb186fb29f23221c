"""The six pipeline steps as plain functions: what each Dagster asset calls.

Each step reads the artifacts of the steps before it from the output folder, writes
its own, and returns a result with a `data_version`: a hash of exactly what decides
its content, so an unchanged input gives an unchanged version.
"""

from __future__ import annotations

import gc
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import models
from . import quantize as quantization
from .config import ChromaConfig
from .dataset import ManifestRow, ScanOptions, read_manifest, scan_dataset, usable, write_manifest
from .device import DeviceInfo, seed_everything
from .latents import Framing, encode_dataset, read_latent_index, write_latent_index
from .memory import AUTO_ORDER, Estimate, PeakRSS, check_fits, choose_precision, estimate, host_available
from .quantize import (
    BNB_PRECISIONS,
    check_available,
    is_complete,
    load_quantized,
    quantize_model,
    quantized_model_key,
    quanto_version,
)
from .storage import atomic_dir, combine_hashes, write_json_atomic
from .text import encode_texts, load_embedding, read_embedding_index, write_embedding_index

TRAINING_KEYS = (
    "network_rank", "lora_alpha", "flux_lora_target", "learning_rate", "lr_scheduler", "lr_warmup_steps",
    "max_grad_norm", "train_batch_size", "gradient_accumulation_steps", "max_train_steps", "mixed_precision",
    "seed", "caption_dropout_probability", "validation_loss_share", "lora_dropout", "init_lora", "num_train_epochs",
    "repeats", "optimizer", "adam_weight_decay", "num_processes",
)
VALIDATION_KEYS = (
    "validation_prompts", "validation_negative_prompt", "validation_seed", "validation_guidance_real",
    "validation_num_inference_steps", "validation_resolution",
)
MODEL_KEYS = ("model_flavour", "pretrained_model_name_or_path", "revision", "mixed_precision")
# output_dir belongs to every step: pointing it elsewhere leaves all artifacts to be made again.

# The settings each step reads. A change to one of them changes that step's code version
# in Dagster (and only that step's), which is how the UI shows a setting made it stale.
STEP_SETTINGS = {
    "raw_dataset": (
        "output_dir", "instance_data_dir", "caption_strategy", "metadata_file", "metadata_file_column",
        "metadata_caption_column", "caption_fallback", "minimum_image_size", "resolution_type", "alpha_background",
        "maximum_upscale", "resolution", "crop_aspect",
    ),
    "image_latents": (
        "output_dir", *MODEL_KEYS, "resolution", "resolution_type", "alpha_background", "crop", "crop_style",
        "crop_aspect",
    ),
    "text_embeddings": (
        "output_dir", *MODEL_KEYS, "tokenizer_max_length", "flux_t5_padding", "text_encoder_precision",
        "validation_prompts", "validation_negative_prompt",
    ),
    "quantized_base_model": ("output_dir", *MODEL_KEYS, "base_model_precision", "base_model_keep_full_precision"),
    "lora_adapter": ("output_dir", *TRAINING_KEYS),
    "validation_grid": ("output_dir", *VALIDATION_KEYS),
}


@dataclass(frozen=True)
class Layout:
    """Where every artifact lives under `output_dir`."""

    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / "dataset" / "manifest.parquet"

    @property
    def dataset_memo(self) -> Path:
        """File hashes remembered by stat, so watching the folder does not re-read every image."""
        return self.root / "dataset" / "file_hashes.json"

    @property
    def dataset_observed(self) -> Path:
        """The files as the last recorded observation saw them, to say what changed since."""
        return self.root / "dataset" / "observed_files.json"

    @property
    def latent_dir(self) -> Path:
        return self.root / "cache" / "latents"

    @property
    def latent_index(self) -> Path:
        return self.root / "cache" / "latents_index.parquet"

    @property
    def embedding_dir(self) -> Path:
        return self.root / "cache" / "text_embeddings"

    @property
    def embedding_index(self) -> Path:
        return self.root / "cache" / "text_embeddings_index.parquet"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    def quantized_dir(self, key: str) -> Path:
        return self.root / "models" / "quantized" / key

    def adapter_dir(self, key: str) -> Path:
        return self.root / "lora" / key

    def checkpoint_dir(self, key: str) -> Path:
        """Checkpoints of the adapter `key` while it trains; a re-run with the same key resumes from them."""
        return self.root / "checkpoints" / key

    def grid_dir(self, key: str) -> Path:
        return self.root / "validation" / key


@dataclass
class StepResult:
    data_version: str
    path: Path
    stats: dict = field(default_factory=dict)


# --- raw_dataset ---------------------------------------------------------------------


@dataclass
class DatasetVersions:
    """raw_dataset has two faces with separate versions, so a caption edit never invalidates latents."""

    images: str  # which pixels are in which file: caption edits leave it alone
    captions: str  # which caption is in which file: image edits leave it alone


def build_manifest(config: ChromaConfig, layout: Layout) -> tuple[StepResult, list[ManifestRow]]:
    options = ScanOptions(
        caption_strategy=config.caption_strategy, metadata_file=config.metadata_file,
        metadata_file_column=config.metadata_file_column, metadata_caption_column=config.metadata_caption_column,
        caption_fallback=config.caption_fallback, minimum_image_size=config.minimum_image_size,
        resolution_type=config.resolution_type, alpha_background=config.alpha_background,
        resolution=config.resolution, crop_aspect=config.crop_aspect, maximum_upscale=config.maximum_upscale,
    )
    rows = scan_dataset(Path(config.instance_data_dir), options)
    ok = usable(rows)
    if not ok:
        reasons = Counter(row.skip_reason for row in rows)
        detail = ", ".join(f"{n} {reason}" for reason, n in reasons.items()) or "no image files found"
        raise ValueError(
            f"no usable sample in {config.instance_data_dir} ({detail}). Each image needs a caption file with the "
            "same name and a .txt suffix (photo.jpg -> photo.txt)."
        )
    write_manifest(rows, layout.manifest)
    versions = DatasetVersions(
        images=combine_hashes(*sorted(f"{r.path}:{r.image_sha256}" for r in ok)),
        captions=combine_hashes(*sorted(f"{r.path}:{r.caption_sha256}" for r in ok)),
    )
    stats = {"samples": len(ok), "skipped": len(rows) - len(ok), "versions": versions}
    return StepResult(combine_hashes(versions.images, versions.captions), layout.manifest, stats), rows


# --- image_latents -------------------------------------------------------------------


def _model_dir(config: ChromaConfig, layout: Layout) -> Path:
    return models.resolve_model_dir(config, layout.models_dir)


def _vae_config(model_dir: Path):
    from diffusers import AutoencoderKL

    return AutoencoderKL.load_config(model_dir, subfolder="vae")


def build_latents(config: ChromaConfig, layout: Layout, device: DeviceInfo, log=print) -> StepResult:
    rows = usable(read_manifest(layout.manifest))
    model_dir = _model_dir(config, layout)
    dtype = device.compute_dtype(config.mixed_precision)

    def load_vae():
        log(f"loading VAE from {model_dir}")
        return models.load_vae(model_dir, dtype).to(device.torch_device).eval()

    entries, stats = encode_dataset(
        rows, Path(config.instance_data_dir), layout.latent_dir, load_vae,
        latent_channels=_vae_config(model_dir)["latent_channels"],
        vae_identity=models.component_identity(model_dir, "vae"),
        resolution=config.resolution, resolution_type=config.resolution_type,
        framing=Framing(config.crop, config.crop_style, config.crop_aspect, config.alpha_background),
        device=device.torch_device, dtype=dtype, workers=config.vae_workers, log=log,
        # On CPU one image at a time beat batches of 8 by 2x (benchmarks/latent_cache.py); GPUs like batches.
        batch_size=config.vae_batch_size or (1 if device.kind == "cpu" else 4),
    )
    device.empty_cache()
    write_latent_index(entries, layout.latent_index)
    buckets = Counter(f"{e.bucket_width}x{e.bucket_height}" for e in entries)
    stats.update(samples=len(entries), buckets=dict(sorted(buckets.items())))
    return StepResult(combine_hashes(*sorted(f"{e.path}:{e.cache_key}" for e in entries)), layout.latent_index, stats)


# --- text_embeddings -----------------------------------------------------------------


def texts_to_encode(config: ChromaConfig, rows: list[ManifestRow]) -> list[tuple[str, str, str]]:
    """Captions, the empty caption (for caption dropout and CFG), validation and negative prompts."""
    texts = [("caption", row.caption, row.path) for row in rows]
    texts.append(("empty", "", ""))
    texts += [("validation", prompt, "") for prompt in config.validation_prompts]
    texts.append(("negative", config.validation_negative_prompt, ""))
    return texts


def _text_width(model_dir: Path) -> int:
    return json.loads((model_dir / "text_encoder" / "config.json").read_text())["d_model"]


def build_embeddings(config: ChromaConfig, layout: Layout, device: DeviceInfo, log=print) -> StepResult:
    rows = usable(read_manifest(layout.manifest))
    model_dir = _model_dir(config, layout)
    dtype = device.compute_dtype(config.mixed_precision)

    def load_encoder():
        log(f"loading T5 text encoder ({config.text_encoder_precision}) from {model_dir}")
        encoder = models.load_text_encoder(model_dir, dtype)
        if config.text_encoder_precision == "int8-quanto":
            quantize_model(encoder, "int8-quanto", keep=())
        return models.load_tokenizer(model_dir), encoder.to(device.torch_device).eval()

    identity = combine_hashes(
        models.component_identity(model_dir, "text_encoder"), models.component_identity(model_dir, "tokenizer"),
        config.text_encoder_precision, quanto_version() if config.text_encoder_precision != "no_change" else "",
    )
    previous = {e.cache_key for e in read_embedding_index(layout.embedding_index)} if layout.embedding_index.is_file() else set()
    entries, stats = encode_texts(
        texts_to_encode(config, rows), layout.embedding_dir, load_encoder,
        width=_text_width(model_dir), encoder_identity=identity,
        max_length=config.tokenizer_max_length, padding=config.flux_t5_padding,
        device=device.torch_device, dtype=dtype, log=log,
    )
    gc.collect()  # the encoder is out of scope now; make sure its memory goes back before training
    device.empty_cache()
    write_embedding_index(entries, layout.embedding_index)
    current = {e.cache_key for e in entries}
    stats.update(distinct_texts=len(current), dropped=len(previous - current))
    return StepResult(embeddings_version(entries), layout.embedding_index, stats)


def embeddings_version(entries) -> str:
    """What training reads from this cache: each file's caption embedding and the empty one.

    Validation prompts are left out on purpose: a new prompt re-renders the grid (its own
    code version says so) but must not make the adapter look out of date.
    """
    return combine_hashes(*sorted(f"{e.role}:{e.path}:{e.cache_key}" for e in entries if e.role in ("caption", "empty")))


# --- quantized_base_model ------------------------------------------------------------


def precision_estimates(config: ChromaConfig, model_dir: Path, device: DeviceInfo) -> dict[str, Estimate]:
    """Training and quantizing memory at every precision `auto` may pick, and the configured one."""
    from .lora import target_modules

    transformer_config = json.loads((model_dir / "transformer" / "config.json").read_text())
    kept_bytes = torch.finfo(device.compute_dtype(config.mixed_precision)).bits // 8
    candidates = {*AUTO_ORDER, config.base_model_precision} - {"auto"}
    return {
        precision: estimate(
            transformer_config, precision, keep=tuple(config.base_model_keep_full_precision), rank=config.network_rank,
            lora_pattern=target_modules(config.flux_lora_target, transformer_config["num_single_layers"]),
            resolution=config.validation_size, batch_size=config.train_batch_size,
            text_tokens=config.tokenizer_max_length, gradient_checkpointing=config.gradient_checkpointing,
            bytes_per_kept=kept_bytes,
        )
        for precision in candidates
    }


def resolve_precision(config: ChromaConfig, layout: Layout, model_dir: Path, device: DeviceInfo) -> tuple[str, str]:
    """The precision this run uses, and why. An `auto` choice is remembered per model and device,
    so later steps and later runs agree (and reuse the same quantized model) while it still fits."""
    requested = config.base_model_precision
    estimates = precision_estimates(config, model_dir, device)
    if requested != "auto":
        return choose_precision(requested, estimates, device.kind, 0)
    memo = layout.models_dir / "auto_precision.json"
    memo_key = combine_hashes(models.component_identity(model_dir, "transformer"), device.name,
                              config.settings_hash("network_rank", "flux_lora_target", "train_batch_size", "resolution",
                                                   "resolution_type", "gradient_checkpointing", "mixed_precision"))
    remembered = json.loads(memo.read_text()) if memo.is_file() else {}
    free = device.free_memory_bytes()
    if memo_key in remembered:
        precision, reason = remembered[memo_key]
        if estimates[precision].training_device <= free:
            return precision, reason + " (remembered)"
    precision, reason = choose_precision("auto", estimates, device.kind, free)
    memo.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(memo, {**remembered, memo_key: [precision, reason]})
    return precision, reason


def quantized_key(config: ChromaConfig, model_dir: Path, device: DeviceInfo, precision: str) -> str:
    identity = models.component_identity(model_dir, "transformer")
    return quantized_model_key(identity, precision, device.compute_dtype(config.mixed_precision),
                               tuple(config.base_model_keep_full_precision))


def build_quantized(config: ChromaConfig, layout: Layout, device: DeviceInfo, log=print) -> StepResult:
    model_dir = _model_dir(config, layout)
    precision, reason = resolve_precision(config, layout, model_dir, device)
    needs = precision_estimates(config, model_dir, device)[precision]
    log(f"{reason}; {needs.describe()}")
    about = {"precision": precision, "reason": reason, "estimate": needs}
    if precision == "no_change":
        identity = models.component_identity(model_dir, "transformer")
        return StepResult(identity, model_dir / "transformer", {**about, "reused": True})

    check_available(precision, device.kind, device.quantization_backends)
    key = quantized_key(config, model_dir, device, precision)
    folder = layout.quantized_dir(key)
    if is_complete(folder):
        log(f"reusing quantized transformer {folder}")
        manifest = json.loads((folder / "manifest.json").read_text())
        return StepResult(key, folder, {**manifest, **about, "reused": True})

    check_fits(needs.quantize_host_peak, host_available(), f"quantizing to {precision}",
               "Close other programs, or pick a smaller base_model_precision.")
    dtype = device.compute_dtype(config.mixed_precision)
    # A GPU quantizes far faster than the CPU; offload_during_startup keeps it free for others.
    on_device = "cpu" if device.kind == "cpu" or config.offload_during_startup else device.torch_device
    source = {"source": str(config.model_source), "revision": config.revision or "", "dtype": str(dtype)}
    keep = tuple(config.base_model_keep_full_precision)
    device.reset_peak_memory()
    with PeakRSS() as host:
        if precision in BNB_PRECISIONS:
            manifest = quantization.quantize_bnb_to_folder(model_dir / "transformer", precision, folder, source, dtype,
                                                           keep, log=log)
        else:
            manifest = quantization.quantize_to_folder(model_dir / "transformer", precision, folder, source, dtype=dtype,
                                                       device=on_device, keep=keep, log=log)
    manifest["peak_host_bytes"] = host.added
    write_json_atomic(folder / "manifest.json", manifest)  # the folder is complete; this only adds the figure
    log(f"saved {precision} transformer to {folder} ({manifest['bytes'] / 2**20:.1f} MiB, host RAM peak "
        f"+{host.added / 2**30:.2f} GiB, {manifest['seconds']:.1f}s)")
    return StepResult(key, folder, {**manifest, **about, "reused": False})


def load_base_transformer(config: ChromaConfig, layout: Layout, model_dir: Path, device: DeviceInfo):
    """The transformer as quantized_base_model saved it; never quantizes again."""
    precision, _reason = resolve_precision(config, layout, model_dir, device)
    if precision == "no_change":
        dtype = device.compute_dtype(config.mixed_precision)
        return models.load_transformer(model_dir, dtype).to(device.torch_device)
    return load_quantized(layout.quantized_dir(quantized_key(config, model_dir, device, precision)), device.torch_device)


# --- lora_adapter --------------------------------------------------------------------


def training_samples(layout: Layout):
    """Pair every cached latent with its caption's cached embedding; returns (samples, empty caption key)."""
    from .train import TrainingSample

    # The two indexes, not the live manifest: a scan that lands mid-run cannot pair a latent
    # with a caption its cache never saw. Each index records the files it was built from.
    latents = {e.path: e for e in read_latent_index(layout.latent_index)}
    texts = read_embedding_index(layout.embedding_index)
    captions = {e.path: e.cache_key for e in texts if e.role == "caption"}
    empty_keys = [e.cache_key for e in texts if e.role == "empty"]
    if latents.keys() != captions.keys() or not empty_keys:
        only_images = sorted(latents.keys() - captions.keys())[:3]
        only_captions = sorted(captions.keys() - latents.keys())[:3]
        raise RuntimeError(
            "image_latents and text_embeddings were built from different scans of the dataset "
            f"(only in latents: {only_images}, only in embeddings: {only_captions}); re-materialize whichever is "
            "unsynced in Dagster (the automation sensor does it on its own)"
        )
    samples = [TrainingSample(latents[path], captions[path]) for path in sorted(latents)]
    return samples, empty_keys[0]


def adapter_key(config: ChromaConfig, layout: Layout, model_dir: Path, device: DeviceInfo, samples, empty_key: str) -> str:
    """What decides the adapter: the (latent, caption) pairs it trains on, the base model and the settings.

    Validation prompts are not part of it: changing them re-renders the grid, never retrains.
    """
    pairs = sorted(f"{s.latent.cache_key}:{s.embedding_key}" for s in samples)
    precision, _reason = resolve_precision(config, layout, model_dir, device)
    base = quantized_key(config, model_dir, device, precision)
    start = models.weights_digest(Path(config.init_lora)) if config.init_lora else ""  # its content, not its name
    return combine_hashes(*pairs, empty_key, base, start, config.settings_hash(*TRAINING_KEYS))


def existing_adapter(config: ChromaConfig, layout: Layout, device: DeviceInfo) -> Path | None:
    """The adapter for the current data and settings if one was trained already, else None."""
    model_dir = _model_dir(config, layout)
    folder = layout.adapter_dir(adapter_key(config, layout, model_dir, device, *training_samples(layout)))
    done = (folder / "pytorch_lora_weights.safetensors").is_file() and (folder / "loss_history.json").is_file()
    return folder / "pytorch_lora_weights.safetensors" if done else None


def build_adapter(config: ChromaConfig, layout: Layout, device: DeviceInfo, log=print, ranks=None,
                  progress_bar: bool = False) -> StepResult:
    from .train import train_lora

    model_dir = _model_dir(config, layout)
    samples, empty_key = training_samples(layout)
    key = adapter_key(config, layout, model_dir, device, samples, empty_key)
    folder = layout.adapter_dir(key)
    adapter = folder / "pytorch_lora_weights.safetensors"
    if adapter.is_file() and (folder / "loss_history.json").is_file():
        log(f"reusing trained adapter {folder}: same data, base model and settings")
        losses = json.loads((folder / "loss_history.json").read_text())
        held_out, summary = folder / "validation_loss.json", folder / "training.json"
        validation = json.loads(held_out.read_text()) if held_out.is_file() else []
        trained = json.loads(summary.read_text()) if summary.is_file() else {}  # how the run that made it went
        return StepResult(key, adapter, {**trained, "steps": len(losses), "losses": losses,
                                         "validation_losses": validation, "reused": True})

    precision, _reason = resolve_precision(config, layout, model_dir, device)
    needs = precision_estimates(config, model_dir, device)[precision]
    log(f"training at {precision}: {needs.describe()}")
    check_fits(needs.training_device, device.free_memory_bytes(), f"training a rank-{config.network_rank} LoRA at {precision}",
               "Use base_model_precision 'auto' or a smaller one, gradient_checkpointing true, train_batch_size 1, or a "
               "lower resolution.")
    seed_everything(config.seed)
    transformer = load_base_transformer(config, layout, model_dir, device)
    device.reset_peak_memory()
    result = train_lora(
        config, transformer, samples, empty_key, layout.latent_dir, layout.embedding_dir,
        vae_config=_vae_config(model_dir), text_width=_text_width(model_dir), output_dir=folder,
        device=device.torch_device, dtype=device.compute_dtype(config.mixed_precision), log=log,
        render_progress=_progress_renderer(config, layout, model_dir, device, log),
        checkpoint_dir=layout.checkpoint_dir(key), ranks=ranks, progress_bar=progress_bar,
    )
    if (folder / "progress").is_dir():  # which prompts and settings the strips show
        write_json_atomic(folder / "progress" / "settings.json", {"validation": config.settings_hash(*VALIDATION_KEYS)})
    stats = {
        "steps": result.steps, "losses": result.losses, "seconds": result.seconds,
        "trainable_parameters": result.trainable_parameters, "peak_memory_bytes": device.peak_memory_bytes(),
        "reused": False, **result.extra,
    }
    return StepResult(key, adapter, stats)


def _progress_renderer(config: ChromaConfig, layout: Layout, model_dir: Path, device: DeviceInfo, log):
    """Renders the validation prompts with the LoRA being trained; the VAE loads at the first render."""
    from .grid import make_pipeline, progress_strip, render

    if not config.validation_every:
        return None
    try:
        prompts, embeddings, negative = validation_embeddings(config, layout, model_dir)
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
        cells = render(
            pipes["pipe"], f"step {step}", prompts=prompts, embeddings=embeddings, negative=negative,
            seeds=config.validation_seeds, guidance=config.validation_guidance_real,
            steps=config.validation_num_inference_steps, size=config.validation_size, device=device.torch_device,
        )
        return progress_strip(cells, step)

    return render_at


# --- validation_grid -----------------------------------------------------------------


def validation_embeddings(config: ChromaConfig, layout: Layout, model_dir: Path):
    """(prompts, {prompt: (embeds, mask)}, negative (embeds, mask)) from the text cache; T5 is never loaded."""
    texts = {(e.role, e.text): e.cache_key for e in read_embedding_index(layout.embedding_index)}
    width = _text_width(model_dir)

    def cached(role: str, text: str):
        if (role, text) not in texts:
            raise RuntimeError(f"the {role} prompt {text!r} has no cached embedding: re-materialize text_embeddings")
        entry = load_embedding(layout.embedding_dir, texts[(role, text)], config.tokenizer_max_length, width)
        if entry is None:
            raise RuntimeError(f"the {role} prompt {text!r}: cached embedding missing or corrupt; re-materialize text_embeddings")
        return entry["prompt_embeds"], entry["attention_mask"]

    prompts = config.validation_prompts
    embeddings = {prompt: cached("validation", prompt) for prompt in prompts}
    return prompts, embeddings, cached("negative", config.validation_negative_prompt)



def build_grid(config: ChromaConfig, layout: Layout, device: DeviceInfo, log=print) -> StepResult:
    from PIL import Image

    from .grid import adapter_is_active, assemble_grid, make_pipeline, render, stack
    from .lora import apply_adapter

    model_dir = _model_dir(config, layout)
    key_adapter = adapter_key(config, layout, model_dir, device, *training_samples(layout))
    adapter = layout.adapter_dir(key_adapter) / "pytorch_lora_weights.safetensors"
    if not adapter.is_file():
        raise FileNotFoundError(f"no adapter for the current data and settings at {adapter}: materialize lora_adapter first")

    prompts, embeddings, negative = validation_embeddings(config, layout, model_dir)
    texts = {(e.role, e.text): e.cache_key for e in read_embedding_index(layout.embedding_index)}
    prompt_keys = [texts[("validation", p)] for p in prompts] + [texts[("negative", config.validation_negative_prompt)]]
    key = combine_hashes(key_adapter, config.settings_hash(*VALIDATION_KEYS), *prompt_keys)
    folder = layout.grid_dir(key)
    grid_path = folder / "grid.png"
    if grid_path.is_file() and (folder / "grid.json").is_file():
        log(f"reusing validation grid {grid_path}: same adapter, prompts and settings")
        summary = json.loads((folder / "grid.json").read_text())
        return StepResult(key, grid_path, {**summary, "reused": True})

    dtype = device.compute_dtype(config.mixed_precision)
    transformer = load_base_transformer(config, layout, model_dir, device)
    vae = models.load_vae(model_dir, dtype).to(device.torch_device)
    pipe = make_pipeline(transformer, vae, models.load_scheduler(model_dir))
    pipe.set_progress_bar_config(disable=True)
    options = dict(
        prompts=prompts, embeddings=embeddings, negative=negative, seeds=config.validation_seeds,
        guidance=config.validation_guidance_real, steps=config.validation_num_inference_steps,
        size=config.validation_size, device=device.torch_device,
    )
    log(f"rendering {len(prompts)} prompts x {len(config.validation_seeds)} seeds, base model")
    cells = render(pipe, "base", **options)
    apply_adapter(pipe.transformer, adapter, "validation")
    if not adapter_is_active(pipe.transformer):
        raise RuntimeError(f"{adapter} loaded but changed no layer of the transformer: its keys match nothing")
    log("rendering with the LoRA")
    cells += render(pipe, "lora", **options)

    grid = assemble_grid(cells, prompts, config.validation_seeds, config.validation_guidance_real,
                         config.validation_num_inference_steps)
    blank = [f"{c.name}: {c.problem}" for c in cells if c.problem]
    # The renders made while training, one strip per `validation_steps`, oldest first; only when
    # they show the current prompts and settings (the adapter is reused across prompt edits).
    strips = [Image.open(path).convert("RGB") for path in sorted(adapter.parent.glob("progress/step_*.png"))]
    tag = adapter.parent / "progress" / "settings.json"
    if strips and (not tag.is_file() or json.loads(tag.read_text())["validation"] != config.settings_hash(*VALIDATION_KEYS)):
        log("progress strips left out: they were rendered with other validation prompts or settings (the next "
            "training run renders new ones)")
        strips = []
    summary = {"cells": len(cells), "blank_cells": blank, "adapter": str(adapter), "progress_strips": len(strips)}
    with atomic_dir(folder) as staging:
        for cell in cells:
            cell.image.save(staging / f"{cell.variant}-p{prompts.index(cell.prompt)}-s{cell.seed}.png")
        grid.save(staging / "grid.png", format="PNG")
        if strips:
            stack(strips).save(staging / "progress.png", format="PNG")
        write_json_atomic(staging / "grid.json", summary)
    return StepResult(key, grid_path, {**summary, "reused": False})
