"""SimpleTuner's keys, each in one class: honoured, no effect here, or refused.

Users bring SimpleTuner's `config.json` and `multidatabackend.json` unchanged. Every key
of SimpleTuner's Chroma and Flux example configs and dataloader examples (and the other
keys its Chroma users write) has a `Rule` below, read from SimpleTuner's own source:

- honoured: used with SimpleTuner's meaning, under our name when it differs (`lora_rank`
  is `network_rank`), its value converted where SimpleTuner writes it differently;
- no effect: accepted, and listed in one note with the reason (Hub upload, trackers,
  cache folders, speed knobs);
- refused: stops before any work with what to use instead, unless the value is one that
  changes nothing (`use_ema: false` is fine, `use_ema: true` is refused).

README's "Coming from SimpleTuner" table is made from these tables (tests keep them equal).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HONOURED, NO_EFFECT, REFUSED = "honoured", "no effect", "refused"


class SimpleTunerKeyError(ValueError):
    """A SimpleTuner key or value this pipeline cannot honour; the message says what to use."""


@dataclass(frozen=True)
class Rule:
    kind: str
    note: str  # honoured: the meaning or difference; no effect: why; refused: what to use instead
    ours: str | None = None  # our key, when the name differs; "" = nothing to set (the value is what we do)
    convert: Callable[[Any], Any] | None = None  # SimpleTuner's value -> ours (raises SimpleTunerKeyError)
    harmless: tuple = field(default=())  # refused keys: values that change nothing, accepted as no effect


def same(note: str = "same meaning", convert=None) -> Rule:
    return Rule(HONOURED, note, convert=convert)


def renamed(ours: str, note: str = "", convert=None) -> Rule:
    return Rule(HONOURED, note or f"= `{ours}`", ours=ours, convert=convert)


def only(allowed: tuple, note: str, advice: str) -> Rule:
    """Honoured for the values that are what this pipeline does; others refused with `advice`."""
    def check(value):
        if value not in allowed:
            raise SimpleTunerKeyError(f"not supported here: {advice}")
        return value
    return Rule(HONOURED, note, ours="", convert=check)


def no_effect(reason: str) -> Rule:
    return Rule(NO_EFFECT, reason)


def refused(advice: str, harmless: tuple = (None, False)) -> Rule:
    return Rule(REFUSED, advice, harmless=harmless)


# --- value conversions ------------------------------------------------------------------
OPTIMIZERS = {
    # SimpleTuner's AdamW variants -> torch AdamW (SimpleTuner's own defaults differ slightly:
    # adamw_bf16 keeps bf16 state with eps 1e-6, optimi-adamw has betas (0.9, 0.99) and no decay).
    **dict.fromkeys(("adamw_bf16", "torch-adamw", "optimi-adamw", "optimi-stableadamw", "bnb-adamw", "adamw"), "adamw"),
    **dict.fromkeys(("bnb-adamw8bit", "bnb-adamw8bit-paged", "ao-adamw8bit", "adamw8bit"), "adamw8bit"),
    **dict.fromkeys(("torch-adafactor", "adafactor"), "adafactor"),
}


def optimizer_name(value: str) -> str:
    if value not in OPTIMIZERS:
        raise SimpleTunerKeyError(
            "no counterpart here; use `adamw` (or adamw_bf16, torch-adamw, optimi-adamw: all train "
            "as torch AdamW), `adamw8bit` (bnb-adamw8bit, ao-adamw8bit) or `adafactor` (torch-adafactor)"
        )
    return OPTIMIZERS[value]


def validation_size(value) -> int | None:
    """SimpleTuner writes `1024`, `"1024"`, `"1024x1024"` (width x height) or `1` (= 1024)."""
    if value is None or isinstance(value, int):
        return 1024 if value == 1 else value
    text = str(value).strip().lower()
    if "," in text:
        raise SimpleTunerKeyError("one size only here (the grid renders every prompt at one size)")
    width, _, height = text.partition("x")
    try:
        width_px, height_px = int(float(width)), int(float(height or width))
    except ValueError:
        raise SimpleTunerKeyError("give a size in pixels, e.g. 1024 or \"1024x1024\"") from None
    if width_px != height_px:
        raise SimpleTunerKeyError(f"the grid renders square images; give one side, e.g. {max(width_px, height_px)}")
    return 1024 if width_px == 1 else width_px


def lora_targets(value):
    """`peft_lora_target_modules`: a JSON list of module names, or a JSON file holding one."""
    if isinstance(value, str) and value.strip().endswith(".json"):
        path = Path(value).expanduser()
        if not path.is_file():
            raise SimpleTunerKeyError("not a file; give a JSON list of module names or its file")
        value = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(value, str):
        value = json.loads(value) if value.strip().startswith("[") else [value]
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        raise SimpleTunerKeyError("give a JSON list of module names, e.g. [\"to_q\", \"to_v\"]")
    return [name for name in value if name.strip()]


def upscale_factor(threshold):
    """SimpleTuner's `max_upscale_threshold` is the share of growth allowed (0.2 = 20%); ours is the factor."""
    return None if threshold is None else 1 + float(threshold)


def lr_scheduler(value: str) -> str:
    return {"cosine_with_warmup": "cosine"}.get(value, value)


def quantize_on_cpu(value: str) -> bool:
    if value not in ("cpu", "accelerator", "pipeline"):
        raise SimpleTunerKeyError("use 'cpu' (quantize on the CPU) or 'accelerator'")
    return value == "cpu"


def unlimited_is_none(value):
    return None if value == 0 else value


def caption_strategy(value: str) -> str:
    return {"instance_prompt": "instanceprompt"}.get(value, value)


def validation_off(value: bool) -> int | None:
    return 0 if value else None


# --- config.json -------------------------------------------------------------------------
PERFORMANCE = "speed or memory only; the result is the same"
CACHES = "caches live under output_dir, keyed by content"
TRACKING = "no tracker here: the Dagster UI keeps every run's metrics, loss curve and grid"
HUB = "nothing is uploaded; the adapter is a file under output_dir (see the README's 'Using the adapter')"

CONFIG_RULES: dict[str, Rule] = {
    # model
    "model_type": same("`lora` (full fine-tunes are not offered)"),
    "model_family": same("`chroma`"),
    "model_flavour": same("base, hd, flash (and our offline tiny and toy)"),
    "pretrained_model_name_or_path": same("a Hub id, a local diffusers folder or one .safetensors file"),
    "revision": same(),
    "base_model_precision": same("int8/int4/int2/fp8-quanto, nf4-bnb, no_change (torchao and sdnq levels are refused "
                                 "with the quanto alternative)"),
    "quantize_via": renamed("offload_during_startup", "`cpu` = `offload_during_startup: true` (quantize on the CPU)",
                            quantize_on_cpu),
    "offload_during_startup": same(),
    "text_encoder_1_precision": renamed("text_encoder_precision", "= `text_encoder_precision` (T5)"),
    "text_encoder_2_precision": no_effect("Chroma has one text encoder"),
    "text_encoder_3_precision": no_effect("Chroma has one text encoder"),
    "text_encoder_4_precision": no_effect("Chroma has one text encoder"),
    "fused_qkv_projections": refused("the LoRA trains the separate q, k, v projections; fused QKV would train other "
                                     "weights. Remove it or set false"),
    "vae_dtype": refused("the VAE runs in the compute dtype (bf16 on GPUs, fp32 on CPUs)",
                         harmless=(None, "default", "bf16", "fp32")),
    "disable_benchmark": no_effect("no baseline benchmark run is made; the grid shows base-model cells"),
    "fuse_qkv_projections": refused("the LoRA trains the separate q, k, v projections; fused QKV would train other "
                                    "weights. Remove it or set false"),
    "attention_mechanism": no_effect("attention runs through torch SDPA; " + PERFORMANCE),
    "sageattention_usage": no_effect(PERFORMANCE),
    "controlnet": refused("ControlNet training is not offered; train a LoRA (remove it or set false)"),
    "quantize_activations": refused("activations stay in the compute dtype; remove it or set false"),
    # data
    "data_backend_config": same("the dataloader list: several datasets, each with its own settings (table below)"),
    "instance_data_dir": same("the one-dataset shorthand"),
    "output_dir": same(),
    "resolution": same("the default of every dataset"),
    "resolution_type": same("the default of every dataset"),
    "minimum_image_size": same("the default of every dataset; SimpleTuner's reading per resolution_type"),
    "max_upscale_threshold": renamed("maximum_upscale", "the default of every dataset: t = `maximum_upscale: 1 + t`; "
                                     "left out, 2.0 here (SimpleTuner: no limit)", upscale_factor),
    "caption_strategy": same("the default of every dataset (`instance_prompt` is read as `instanceprompt`)",
                             caption_strategy),
    "instance_prompt": same("the caption of `caption_strategy: instanceprompt`"),
    "prepend_instance_prompt": same("captions become `instance_prompt + \" \" + caption` (the default of every dataset)"),
    "only_instance_prompt": renamed("caption_strategy", "true = `caption_strategy: instanceprompt`",
                                    lambda v: "instanceprompt" if v else None),
    "data_backend_sampling": same("`uniform`: datasets weighted by `probability`; `auto-weighting`: also by size"),
    "caption_dropout_probability": same("None = 0", lambda v: v or 0.0),
    "tokenizer_max_length": same(),
    "t5_padding": renamed("flux_t5_padding", "= `flux_t5_padding` (what SimpleTuner's Chroma code reads)"),
    "flux_t5_padding": same("the quickstart's name for `t5_padding`"),
    "vae_batch_size": same(PERFORMANCE),
    "disable_bucket_pruning": no_effect("buckets are never pruned here: a bucket smaller than the batch trains as a "
                                        "smaller batch (SimpleTuner prunes unless this is true)"),
    "aspect_bucket_rounding": refused("bucket aspect ratios are rounded to 2 decimals here; remove the key",
                                      harmless=(None, 2)),
    "aspect_bucket_alignment": refused("Chroma buckets are multiples of 64 (as SimpleTuner forces for Chroma)",
                                       harmless=(None, 64)),
    "compress_disk_cache": no_effect(CACHES),
    "cache_dir": no_effect(CACHES + "; Hub downloads use the Hugging Face cache (HF_HOME)"),
    "cache_dir_vae": no_effect(CACHES),
    "cache_dir_text": no_effect(CACHES),
    "skip_file_discovery": no_effect("the scan re-reads only files whose size, mtime or inode changed"),
    "preserve_data_backend_cache": no_effect(CACHES),
    "override_dataset_config": no_effect(CACHES + ": a changed setting makes new entries, never a conflict"),
    "ignore_missing_files": no_effect("a missing file is skipped and listed with its reason"),
    "delete_unwanted_images": refused("your files are never deleted; unusable images are skipped and listed with the "
                                      "reason. Remove it or set false"),
    "delete_problematic_images": refused("your files are never deleted; unreadable images are skipped and listed. "
                                         "Remove it or set false"),
    "vae_cache_ondemand": no_effect(PERFORMANCE),
    "vae_enable_tiling": no_effect(PERFORMANCE),
    "vae_enable_slicing": no_effect(PERFORMANCE),
    "keep_vae_loaded": no_effect(PERFORMANCE),
    **dict.fromkeys(("write_batch_size", "read_batch_size", "max_workers", "image_processing_batch_size",
                     "aspect_bucket_worker_count", "torch_num_threads", "enable_multiprocessing", "dataloader_prefetch",
                     "dataloader_prefetch_qlen", "metadata_update_interval", "accelerator_cache_clear_interval",
                     "aws_max_pool_connections", "gradient_checkpointing_interval", "disable_tf32",
                     "validation_torch_compile", "validation_torch_compile_mode"), no_effect(PERFORMANCE)),
    # LoRA
    "lora_rank": renamed("network_rank", "= `network_rank` (the quickstart's name)"),
    "network_rank": same("SimpleTuner's `lora_rank`"),
    "lora_alpha": same("None = the rank"),
    "lora_dropout": same("default 0.0 here (SimpleTuner: 0.1)"),
    "lora_type": only(("standard",), "`standard` (PEFT LoRA) is what this trains",
                      "LyCORIS is not offered; use lora_type 'standard'"),
    "peft_lora_mode": only(("standard",), "`standard`", "SingLoRA is not offered; use 'standard'"),
    "lora_init_type": only(("default",), "`default` (PEFT's)", "only PEFT's default LoRA init is offered"),
    "use_dora": refused("DoRA is not offered; remove it or set false"),
    "flux_lora_target": same("SimpleTuner's Chroma presets: all, all+ffs, context, context+ffs, tiny, "
                             "all+ffs+embedder, tiny+embedder, ai-toolkit (nano = Flux's one-layer preset)"),
    "peft_lora_target_modules": renamed("flux_lora_target", "a list of module names, replaces the preset", lora_targets),
    "init_lora": same(),
    # optimisation
    "optimizer": same("AdamW variants train as torch AdamW, 8-bit ones as bitsandbytes AdamW8bit (the mapping is "
                      "logged); others refused", optimizer_name),
    "optimizer_config": refused("set `adam_weight_decay` instead", harmless=(None, "")),
    "optimizer_beta1": refused("AdamW's betas are torch's (0.9, 0.999) here", harmless=(None,)),
    "optimizer_beta2": refused("AdamW's betas are torch's (0.9, 0.999) here", harmless=(None,)),
    "adam_weight_decay": same("applied here (SimpleTuner reads it only under DeepSpeed)"),
    "adam_beta1": no_effect("SimpleTuner reads it only under DeepSpeed; AdamW's betas are torch's here"),
    "adam_beta2": no_effect("SimpleTuner reads it only under DeepSpeed; AdamW's betas are torch's here"),
    "adam_epsilon": no_effect("SimpleTuner reads it only under DeepSpeed; AdamW's eps is torch's here"),
    "learning_rate": same(),
    "lr_scheduler": same("constant, constant_with_warmup, cosine (= cosine_with_warmup), linear", lr_scheduler),
    "lr_warmup_steps": same(),
    "lr_num_cycles": no_effect("only for cosine_with_restarts, not offered"),
    "lr_power": no_effect("only for polynomial, not offered"),
    "lr_end": no_effect("only for polynomial, not offered"),
    "max_train_steps": same(),
    "num_train_epochs": same("0 = train `max_train_steps`"),
    "train_batch_size": same(),
    "gradient_accumulation_steps": same(),
    "mixed_precision": same("bf16, fp16, no"),
    "gradient_checkpointing": same(),
    "max_grad_norm": same("0 = no clipping; default 1.0 here (SimpleTuner: 2.0)"),
    "grad_clip_method": same("`value` clips each gradient element, `norm` the total norm; default `norm` here "
                             "(SimpleTuner: value)"),
    "seed": same("every seed is a plain seed (SimpleTuner makes 0 and -1 time-based/random); runs stay reproducible"),
    "checkpoint_step_interval": renamed("checkpointing_steps"),
    "checkpointing_steps": same(),
    "checkpoints_total_limit": same("0 = keep all", unlimited_is_none),
    "checkpoint_epoch_interval": refused("use checkpointing_steps"),
    "resume_from_checkpoint": only(("latest", None), "`latest`: a run always resumes from its newest checkpoint",
                                   "use init_lora to start from another LoRA file"),
    "use_ema": refused("EMA is not offered; remove it or set false"),
    # sigmas
    "flow_schedule_shift": same("shift `s·σ/(1+(s-1)·σ)` before Chroma's tail remap, as SimpleTuner's Chroma code "
                                "does; default 1 (none) here, as the quickstart advises (SimpleTuner: 3)"),
    "flow_schedule_auto_shift": refused("set flow_schedule_shift instead", harmless=(None, False)),
    "flux_fast_schedule": refused("Chroma's own sigma sampling is used; remove it or set false"),
    "flow_use_beta_schedule": refused("Chroma's own sigma sampling is used; remove it or set false"),
    "flow_use_uniform_schedule": refused("Chroma's own sigma sampling is used; remove it or set false"),
    "flow_sigmoid_scale": refused("sigmas come from sigmoid(N(0, 1)); remove it", harmless=(None, 1, 1.0)),
    "flux_guidance_mode": no_effect("Chroma trains no guidance embedding"),
    "flux_guidance_value": no_effect("Chroma trains no guidance embedding"),
    "flux_guidance_min": no_effect("Chroma trains no guidance embedding"),
    "flux_guidance_max": no_effect("Chroma trains no guidance embedding"),
    **dict.fromkeys(("snr_gamma", "use_soft_min_snr", "input_perturbation", "noise_offset", "offset_noise",
                     "timestep_bias_strategy", "masked_loss_probability", "tread_config", "distillation_method"),
                    refused("plain flow-matching loss only; remove it", harmless=(None, False, 0, 0.0, "none"))),
    "loss_type": refused("the loss is the mean squared error; remove it", harmless=(None, "l2", "mse")),
    # validation
    "validation_prompt": same(),
    "user_prompt_library": same("`{\"name\": \"prompt\"}` or `{\"name\": {\"prompt\": ...}}` (or a list)"),
    "validation_prompt_library": refused("SimpleTuner's built-in prompts are not shipped; put prompts in "
                                         "user_prompt_library"),
    "validation_negative_prompt": same("default \"\" here (SimpleTuner: \"blurry, cropped, ugly\")"),
    "validation_seed": same(),
    "validation_guidance": renamed("validation_guidance_real", "the pipeline's guidance_scale (Chroma's CFG), when "
                                   "`validation_guidance_real` is not set"),
    "validation_guidance_real": same("the pipeline's guidance_scale (1.0 = single pass)"),
    "validation_guidance_skip_layers": refused("skip-layer guidance is not applied; remove it", harmless=(None, [])),
    "validation_guidance_skip_layers_start": refused("skip-layer guidance is not applied; remove it"),
    "validation_guidance_skip_layers_stop": refused("skip-layer guidance is not applied; remove it"),
    "validation_guidance_skip_scale": refused("skip-layer guidance is not applied; remove it"),
    "validation_guidance_rescale": refused("CFG rescale is not applied; remove it", harmless=(None, 0, 0.0)),
    "validation_no_cfg_until_timestep": refused("CFG runs at every step here; remove it", harmless=(None, 0)),
    "validation_num_inference_steps": same(),
    "validation_resolution": same("1024, \"1024\", \"1024x1024\" or 1 (= 1024); square only", validation_size),
    "validation_steps": same("0 = no renders during training"),
    "validation_step_interval": renamed("validation_steps"),
    "validation_disable": renamed("validation_steps", "true = no renders during training (the grid asset still "
                                  "renders when materialized)", validation_off),
    "validation_disable_unconditional": no_effect("no unconditional render is made"),
    "validation_on_startup": no_effect("the grid always has base-model cells beside the LoRA's"),
    "num_validation_images": refused("one image per prompt and seed; list seeds in validation_seed",
                                     harmless=(None, 1)),
    "validation_randomize": refused("validation seeds are fixed; list them in validation_seed"),
    "validation_noise_scheduler": refused("the model's own scheduler is used; remove it"),
    "num_eval_images": no_effect("no CLIP evaluation; `validation_loss_share` gives a held-out loss"),
    "eval_steps_interval": no_effect("no CLIP evaluation; `validation_loss_share` gives a held-out loss"),
    "evaluation_type": no_effect("no CLIP evaluation; `validation_loss_share` gives a held-out loss"),
    "eval_dataset_id": no_effect("no CLIP evaluation; `validation_loss_share` gives a held-out loss"),
    # tracking and the Hub
    **dict.fromkeys(("report_to", "tracker_project_name", "tracker_run_name", "tracker_image_layout", "logging_dir"),
                    no_effect(TRACKING)),
    **dict.fromkeys(("push_to_hub", "push_checkpoints_to_hub", "hub_model_id", "model_card_note",
                     "model_card_safe_for_work", "modelspec_comment"), no_effect(HUB)),
    "webhook_config": no_effect("Dagster sensors and alerts take this role"),
    "webhook_reporting_interval": no_effect("Dagster sensors and alerts take this role"),
}

# --- multidatabackend.json entries -------------------------------------------------------
RESIZED_FIRST = ("an image is resized to cover its bucket before any crop, so a crop always spans its whole shorter "
                 "side; there is no pre-crop size to set (SimpleTuner crops from the downsampled image)")

def dataset_type(value: str) -> str:
    if value not in ("local", "huggingface"):
        raise SimpleTunerKeyError("these datasets are not read here; copy the images to a local folder "
                                  "(type 'local') or use a Hugging Face dataset (type 'huggingface')")
    return value


def crop_style(value: str) -> str:
    if value == "face":
        raise SimpleTunerKeyError("face crops are not offered; use center, random or corner")
    return value


def crop_aspect(value: str) -> str:
    if value in ("closest", "random"):
        raise SimpleTunerKeyError("needs crop_aspect_buckets, not offered; use 'square' or 'preserve'")
    return value


def chance(value):
    return float(value) if value else 1.0  # SimpleTuner reads 0 or a missing value as 1.0


DATASET_RULES: dict[str, Rule] = {
    "id": same("names the dataset; its samples are `<id>/<path>` in the manifest"),
    "type": same("`local` or `huggingface`; aws, csv and webshart are refused", dataset_type),
    "dataset_type": same("`image`; the `text_embeds` / `image_embeds` entries have no effect (" + CACHES + ")"),
    "disabled": same("the entry is skipped"),
    "disable": same("the entry is skipped"),
    "default": no_effect("text_embeds routing; " + CACHES),
    "instance_data_dir": same("relative to the config's folder, else the working directory"),
    "instance_data_root": renamed("instance_data_dir"),
    "dataset_name": same("a folder written by `save_to_disk`, or a Hub id"),
    "split": same(),
    "revision": same("the Hub dataset's revision"),
    "image_column": same(),
    "caption_column": same("a column name, or a list (the first non-empty is the caption)"),
    "huggingface": same("its dataset_name, split, revision, image_column, caption_column; top-level keys win"),
    "resolution": same(),
    "resolution_type": same("pixel, area, pixel_area"),
    "minimum_image_size": same("pixel: both sides; area: megapixels; pixel_area: width x height >= value²"),
    "minimum_aspect_ratio": same("width / height below it: skipped"),
    "maximum_aspect_ratio": same("width / height above it: skipped"),
    "max_upscale_threshold": renamed("maximum_upscale", "t = `maximum_upscale: 1 + t`; left out, the main config's, "
                                     "else 2.0 (SimpleTuner: no limit)", upscale_factor),
    "maximum_image_size": no_effect(RESIZED_FIRST),
    "target_downsample_size": no_effect(RESIZED_FIRST),
    "crop": same("default false in a dataloader file, as in SimpleTuner"),
    "crop_style": same("center, random (fixed per image), corner; default random, as in SimpleTuner", crop_style),
    "crop_aspect": same("square or preserve; default square when cropping, as in SimpleTuner", crop_aspect),
    "crop_aspect_buckets": refused("only for crop_aspect closest/random, not offered"),
    "caption_strategy": same("textfile, filename, instanceprompt, parquet, huggingface (and our auto, metadata)",
                             caption_strategy),
    "instance_prompt": same(),
    "prepend_instance_prompt": same("`instance_prompt + \" \" + caption`"),
    "only_instance_prompt": same("= caption_strategy instanceprompt"),
    "parquet": same("path, filename_column, caption_column, fallback_caption_column, identifier_includes_extension"),
    "disable_multiline_split": refused("a caption file is one caption here (SimpleTuner splits lines into variants); "
                                       "join the lines, or set true", harmless=(None, True)),
    "caption_filter_list": refused("captions are used as written; edit them, and the one changed caption re-encodes"),
    "caption_shuffle": refused("captions are used as written; remove it"),
    "metadata_backend": no_effect("image sizes are read during the scan; " + PERFORMANCE),
    "repeats": same("0 = each image once per epoch"),
    "probability": same("the weight of this dataset in choosing the next batch (0 = 1, as in SimpleTuner); it "
                        "changes the order, not how often a sample is seen (1 + repeats times an epoch)", chance),
    "timestep_sampling_offset": refused("one sigma distribution for all datasets; remove it", harmless=(None, 0, 0.0)),
    **dict.fromkeys(("start_epoch", "start_step", "end_epoch", "end_step", "max_num_samples"),
                    refused("every dataset trains for the whole run; remove it", harmless=(None, 0))),
    "is_regularisation_data": refused("regularisation data is not offered; remove it or set false"),
    "is_regularization_data": refused("regularisation data is not offered; remove it or set false"),
    **dict.fromkeys(("delete_unwanted_images", "delete_problematic_images", "delete_nsfw_images"),
                    refused("your files are never deleted; unusable images are skipped and listed. Set false")),
    **dict.fromkeys(("cache_dir_vae", "cache_dir", "vae_cache_clear_each_epoch", "preserve_data_backend_cache",
                     "text_embeds", "image_embeds"), no_effect(CACHES)),
    **dict.fromkeys(("skip_file_discovery", "metadata_update_interval", "write_batch_size", "hash_filenames",
                     "shorten_filenames", "vae_cache_ondemand", "text_cache_ondemand", "ignore_epochs",
                     "disable_validation", "vae_cache_disable", "text_cache_disable", "text_encoder_batch_size",
                     "aspect_bucket_worker_count"), no_effect(PERFORMANCE)),
    **dict.fromkeys(("conditioning", "conditioning_data", "source_dataset_id", "conditioning_type"),
                    refused("conditioning datasets are not offered; remove it")),
}
AWS_PREFIX = "aws_"


@dataclass
class Translation:
    values: dict
    mapped: list[str] = field(default_factory=list)  # "optimizer 'adamw_bf16' -> 'adamw'"
    no_effect: dict[str, str] = field(default_factory=dict)  # key -> reason


def translate(values: dict, rules: dict[str, Rule], where: str, own_keys: set[str]) -> Translation:
    """SimpleTuner's keys made ours: renamed, converted, set aside with a reason, or refused."""
    result = Translation({})
    explicit = {key for key in values if key in own_keys}
    for key, value in values.items():
        rule = rules.get(key) or (refused("S3 datasets are not read here; copy the images to a local folder",
                                          harmless=(None, "")) if key.startswith(AWS_PREFIX) else None)
        if rule is None:
            result.values[key] = value  # ours, or unknown (the config warns about those)
            continue
        if rule.kind == NO_EFFECT or (rule.kind == REFUSED and _is_harmless(value, rule.harmless)):
            result.no_effect[key] = rule.note if rule.kind == NO_EFFECT else "set to a value that changes nothing"
            continue
        if rule.kind == REFUSED:
            raise SimpleTunerKeyError(f"{where}: `{key}` = {value!r} is not supported: {rule.note}")
        try:
            converted = rule.convert(value) if rule.convert else value
        except SimpleTunerKeyError as exc:
            raise SimpleTunerKeyError(f"{where}: `{key}` = {value!r}: {exc}") from None
        target = key if rule.ours is None else rule.ours
        if target == "" or (converted is None and value is not None):
            continue  # the value is what this pipeline does anyway, or leaves the setting at its default
        if target != key and target in explicit:
            if values[target] != converted:
                result.mapped.append(f"`{key}` = {value!r} set aside: `{target}` = {values[target]!r} is also set")
            continue
        if converted != value or target != key:
            result.mapped.append(f"`{key}` = {value!r} -> `{target}` = {converted!r}")
        result.values[target] = converted
        explicit.add(target)
    return result


def grouped(no_effect: dict[str, str]) -> str:
    """'`a`, `b` (reason); `c` (other reason)': one note for every key set aside."""
    by_reason: dict[str, list[str]] = {}
    for key, reason in sorted(no_effect.items()):
        by_reason.setdefault(reason, []).append(f"`{key}`")
    return "; ".join(f"{', '.join(keys)} ({reason})" for reason, keys in by_reason.items())


def _is_harmless(value, harmless: tuple) -> bool:
    return any(value is h or (type(value) is type(h) and value == h) for h in harmless)


def key_table() -> str:
    """The README's table of every SimpleTuner key and its class."""
    lines = []
    for title, rules in (("config.json", CONFIG_RULES), ("multidatabackend.json (each dataset)", DATASET_RULES)):
        lines += [f"| {title} key | class | here |", "|---|---|---|"]
        for key in sorted(rules):
            rule = rules[key]
            note = rule.note.replace("|", "\\|")
            lines.append(f"| `{key}` | {rule.kind} | {note} |")
        lines.append("")
    counts = counts_by_class()
    lines.append(", ".join(f"{n} {kind}" for kind, n in counts.items()) + " (config.json and dataset keys together).")
    return "\n".join(lines)


def counts_by_class() -> dict[str, int]:
    rules = [*CONFIG_RULES.values(), *DATASET_RULES.values()]
    return {kind: sum(rule.kind == kind for rule in rules) for kind in (HONOURED, NO_EFFECT, REFUSED)}
