"""The typed training config.

It reads the JSON (comments allowed) that SimpleTuner users already have for Chroma:
the quickstart's keys keep their names and defaults. Unknown keys are reported in one
warning; a bad value stops everything before any model is loaded, with a message that
names the key, the value and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .buckets import DEFAULT_MAXIMUM_UPSCALE
from .databackend import (
    FRAMING_KEYS,
    MIX_KEYS,
    SCAN_KEYS,
    SHORTHAND_ID,
    DataBackendError,
    ImageDataset,
    describe_error,
    did_you_mean,
    image_entries,
)
from .errors import UserError
from .simpletuner import CONFIG_RULES, SimpleTunerKeyError, grouped, translate
from .storage import parse_jsonc

FLAVOUR_REPOS = {
    "base": "lodestones/Chroma1-Base",
    "hd": "lodestones/Chroma1-HD",
    "flash": "lodestones/Chroma1-Flash",
}
# Built locally, nothing downloaded: `tiny` (random weights, for tests) and `toy` (trained, draws shapes).
LOCAL_FLAVOURS = ("tiny", "toy")
FLAVOURS = (*FLAVOUR_REPOS, *LOCAL_FLAVOURS)
KEEP_FULL_PRECISION = ("distilled_guidance_layer*", "x_embedder", "context_embedder", "proj_out", "norm_out*")

# Settings that joined a cache key after artifacts keyed without them existed (see settings_hash).
ADDED_LATER = ("num_machines", "instance_prompt", "prepend_instance_prompt", "flow_schedule_shift", "grad_clip_method",
               "dataset_scan", "dataset_framing", "dataset_mix", "data_backend_sampling")


class ConfigError(UserError, ValueError):
    """A config file that cannot be used; the message says which key and what to do."""


class ChromaConfig(BaseModel):
    model_config = ConfigDict(extra="allow", validate_assignment=True, frozen=True)

    # --- model -------------------------------------------------------------------
    model_type: Literal["lora"] = "lora"
    model_family: Literal["chroma"] = "chroma"
    model_flavour: Literal["base", "hd", "flash", "tiny", "toy"] = "base"
    pretrained_model_name_or_path: str | None = None
    revision: str | None = None
    base_model_precision: Literal[
        "no_change", "bf16", "int8-quanto", "int4-quanto", "int2-quanto", "fp8-quanto", "nf4-bnb", "int8-bnb", "auto",
    ] = "no_change"
    # Layers quantization hurts most and that weigh little: the approximator, the embedders, the output.
    base_model_keep_full_precision: list[str] = list(KEEP_FULL_PRECISION)
    offload_during_startup: bool = False

    # --- data ----------------------------------------------------------------------
    instance_data_dir: str = "datasets/chroma"
    # SimpleTuner's dataloader file: several datasets, each with its own folder and settings (databackend.py)
    data_backend_config: str | None = None
    datasets: list[ImageDataset] = []  # read from data_backend_config by load_config (or written inline)
    output_dir: str = "chroma-output"
    # auto: metadata.* if present, else .txt; filename: the file name; instanceprompt: `instance_prompt` for all
    caption_strategy: Literal["auto", "textfile", "metadata", "filename", "instanceprompt"] = "auto"
    instance_prompt: str | None = None
    prepend_instance_prompt: bool = False  # captions become `instance_prompt + " " + caption`
    metadata_file: str | None = None
    metadata_file_column: str = "file_name"
    metadata_caption_column: str = "text"
    caption_fallback: Literal["skip", "filename", "empty"] = "skip"
    minimum_image_size: float = Field(0, ge=0)
    # Skip images that would need more upscaling than this to cover their bucket; None (null): no limit.
    maximum_upscale: float | None = Field(DEFAULT_MAXIMUM_UPSCALE, ge=1)
    crop: bool = True  # False: stretch to the bucket instead of cropping the overflow
    crop_style: Literal["center", "random", "corner"] = "center"
    crop_aspect: Literal["preserve", "square"] = "preserve"
    alpha_background: str = "white"  # what transparent pixels become
    # pixel / pixel_area: pixels (a multiple of 64); area: megapixels, 1.0 = 1024x1024
    resolution: float = Field(1024, gt=0)
    resolution_type: Literal["pixel", "area", "pixel_area"] = "pixel_area"
    tokenizer_max_length: int = Field(512, ge=8, le=512)
    text_encoder_precision: Literal["no_change", "int8-quanto"] = "no_change"  # int8: T5-XXL in ~5 GB
    flux_t5_padding: Literal["unmodified", "zero"] = "unmodified"
    caption_dropout_probability: float = Field(0.0, ge=0.0, lt=1.0)
    vae_batch_size: int | None = Field(None, ge=1)  # None: 1 on CPU (measured faster there), 4 on a GPU
    vae_workers: int | None = Field(None, ge=0)  # processes decoding images ahead of the VAE; None: up to 4
    # The blocking cache checks read back what the last run encoded and trust the rest from file
    # headers and the flags kept at encoding; true reads every cached tensor.
    deep_cache_checks: bool = False

    # --- LoRA and optimisation ----------------------------------------------------
    network_rank: int = Field(16, ge=1)
    lora_alpha: float | None = Field(None, gt=0)
    flux_lora_target: Literal["all", "all+ffs", "context", "context+ffs", "tiny", "nano", "all+ffs+embedder",
                              "tiny+embedder", "ai-toolkit"] | list[str] = "all"
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    init_lora: str | None = None  # a diffusers-format LoRA to start from (same rank and targets)
    learning_rate: float = Field(1e-4, gt=0)
    lr_scheduler: Literal["constant", "constant_with_warmup", "cosine", "linear"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)  # 0: no clipping
    grad_clip_method: Literal["norm", "value"] = "norm"  # value: clip each gradient element (SimpleTuner's default)
    flow_schedule_shift: float = Field(1.0, ge=0)  # >1 shifts sigmas toward noise before the Chroma remap; 0 = 1
    train_batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_train_steps: int = Field(1000, ge=1)
    num_train_epochs: int | None = Field(None, ge=0)  # when set, replaces max_train_steps; 0 = unset (SimpleTuner)
    repeats: int = Field(0, ge=0)  # extra times each image is seen per epoch (SimpleTuner's meaning: 0 = once)
    optimizer: Literal["adamw", "adamw8bit", "adafactor"] = "adamw"
    data_backend_sampling: Literal["uniform", "auto-weighting"] = "uniform"  # auto: probability x dataset size
    num_processes: int = Field(1, ge=1)  # per machine; >1: lora_adapter launches `accelerate launch` (DDP, one GPU each)
    num_machines: int = Field(1, ge=1)  # >1: accelerate's multi-machine launch; this machine is `machine_rank`
    machine_rank: int = Field(0, ge=0)  # the Dagster machine is usually 0; others run `python -m chroma_pipeline.launch`
    main_process_ip: str = "127.0.0.1"  # where rank 0 listens when num_machines > 1 (an address the others reach)
    main_process_port: int = Field(29500, ge=1, le=65535)
    adam_weight_decay: float = Field(1e-2, ge=0.0)
    mixed_precision: Literal["bf16", "fp16", "no"] = "bf16"
    gradient_checkpointing: bool = True
    seed: int = 42
    checkpointing_steps: int = Field(500, ge=1)
    checkpoints_total_limit: int | None = Field(None, ge=1)  # keep only the newest N checkpoints
    validation_loss_share: float = Field(0.0, ge=0.0, lt=1.0)  # samples held out of training to measure overfitting

    # --- validation ---------------------------------------------------------------
    validation_prompt: str | list[str] | None = "a photo of a cat"
    user_prompt_library: str | None = None  # JSON file: {"name": "prompt", ...} or ["prompt", ...]; adds prompts
    validation_negative_prompt: str = ""
    validation_seed: int | list[int] = 42
    validation_guidance_real: float = Field(1.0, ge=1.0)
    validation_num_inference_steps: int = Field(20, ge=1)
    validation_resolution: int | None = Field(None, ge=64)  # SimpleTuner's "1024x1024" is read as 1024
    validation_steps: int | None = Field(None, ge=0)  # render the prompts while training; None: at checkpointing_steps, 0: never

    # --- automation ----------------------------------------------------------------
    retrain_cron: str = "0 3 * * *"  # when `nightly_retrain` looks for dataset changes
    retrain_timezone: str = "UTC"
    retrain_schedule_enabled: bool = False  # off until you turn it on here or in the UI (Automation)

    @field_validator("validation_resolution")
    @classmethod
    def _multiple_of_64(cls, value: int | None) -> int | None:
        if value is not None and value % 64:
            raise ValueError(f"must be a multiple of 64 (got {value}; try {max(64, round(value / 64) * 64)})")
        return value

    @model_validator(mode="after")
    def _resolution_matches_type(self):
        if self.resolution_type == "area":
            if self.resolution > 16:
                raise ValueError(
                    f"`resolution` = {self.resolution:g} with resolution_type 'area' means megapixels; "
                    "use e.g. 1.0 (about 1024x1024), or resolution_type 'pixel_area' for a side in pixels"
                )
        elif self.resolution % 64 or self.resolution < 64:
            suggestion = max(64, round(self.resolution / 64) * 64)
            raise ValueError(
                f"`resolution` = {self.resolution:g} must be a multiple of 64 pixels for resolution_type "
                f"{self.resolution_type!r} (try {suggestion}), or set resolution_type 'area' for megapixels"
            )
        return self

    @model_validator(mode="after")
    def _dataset_resolutions_match_their_type(self):
        for dataset in self.datasets:
            resolution, kind = dataset.setting("resolution", self), dataset.setting("resolution_type", self)
            if kind == "area" and resolution > 16:
                raise ValueError(f"dataset {dataset.id!r}: `resolution` = {resolution:g} with resolution_type 'area' "
                                 "means megapixels; use e.g. 1.0 (about 1024x1024)")
            if kind != "area" and (resolution % 64 or resolution < 64):
                raise ValueError(f"dataset {dataset.id!r}: `resolution` = {resolution:g} must be a multiple of 64 "
                                 f"pixels for resolution_type {kind!r} (try {max(64, round(resolution / 64) * 64)})")
        return self

    @model_validator(mode="after")
    def _machine_rank_in_range(self):
        if self.machine_rank >= self.num_machines:
            raise ValueError(
                f"`machine_rank` = {self.machine_rank} with `num_machines` = {self.num_machines}: machines are numbered "
                f"0 to {self.num_machines - 1}"
            )
        return self

    @field_validator("alpha_background")
    @classmethod
    def _a_colour(cls, value: str) -> str:
        from PIL import ImageColor

        try:
            ImageColor.getrgb(value)
        except ValueError:
            raise ValueError("must be a colour name or #rrggbb, e.g. 'white', 'black', '#808080'") from None
        return value

    @field_validator("num_train_epochs")
    @classmethod
    def _zero_epochs_is_unset(cls, value: int | None) -> int | None:
        return value or None  # SimpleTuner's `num_train_epochs: 0` means "train max_train_steps"

    @field_validator("base_model_precision")
    @classmethod
    def _bf16_is_no_change(cls, value: str) -> str:
        return "no_change" if value == "bf16" else value  # the checkpoint is bf16: nothing to do

    @field_validator("validation_prompt", "validation_seed")
    @classmethod
    def _not_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("must not be an empty list")
        return value

    # --- derived values --------------------------------------------------------------
    @property
    def unknown_keys(self) -> list[str]:
        return sorted(self.model_extra or {})

    @property
    def image_datasets(self) -> list[ImageDataset]:
        """The datasets to train on: the dataloader file's, or `instance_data_dir` alone."""
        return list(self.datasets) or [ImageDataset(id=SHORTHAND_ID, instance_data_dir=self.instance_data_dir)]

    @property
    def named_datasets(self) -> bool:
        return bool(self.datasets)

    # Per dataset, the settings one step reads, as used (None for the one-folder shorthand, whose
    # settings are the main keys). Steps list these in their SETTINGS like any other setting.
    @property
    def dataset_scan(self) -> dict | None:
        return self._per_dataset(SCAN_KEYS)

    @property
    def dataset_framing(self) -> dict | None:
        return self._per_dataset(FRAMING_KEYS)

    @property
    def dataset_mix(self) -> dict | None:
        return self._per_dataset(MIX_KEYS)

    def _per_dataset(self, keys: tuple[str, ...]) -> dict | None:
        return {d.id: d.settings(keys, self) for d in self.datasets} if self.datasets else None

    @property
    def lora_alpha_value(self) -> float:
        return float(self.lora_alpha if self.lora_alpha is not None else self.network_rank)

    @model_validator(mode="after")
    def _some_validation_prompt(self):
        if not self.validation_prompts:
            raise ValueError("no validation prompt: set `validation_prompt` or `user_prompt_library`")
        return self

    @property
    def validation_prompts(self) -> list[str]:
        """`validation_prompt` then the library's prompts, each once, in order."""
        prompts = [self.validation_prompt] if isinstance(self.validation_prompt, str) else list(self.validation_prompt or [])
        if self.user_prompt_library:
            prompts += read_prompt_library(Path(self.user_prompt_library))
        return list(dict.fromkeys(prompts))

    @property
    def validation_every(self) -> int:
        return self.checkpointing_steps if self.validation_steps is None else self.validation_steps

    @property
    def validation_seeds(self) -> list[int]:
        return [self.validation_seed] if isinstance(self.validation_seed, int) else list(self.validation_seed)

    @property
    def validation_size(self) -> int:
        """`validation_resolution`, else the side of the largest dataset's resolution."""
        if self.validation_resolution:
            return self.validation_resolution

        def side(dataset: ImageDataset) -> int:
            resolution = dataset.setting("resolution", self)
            if dataset.setting("resolution_type", self) == "area":
                return max(64, round((resolution**0.5) * 1024 / 64) * 64)
            return int(resolution)

        return max(side(dataset) for dataset in self.image_datasets)

    @property
    def model_source(self) -> str:
        """What to load: an explicit path or repo id wins over the flavour's repo."""
        if self.pretrained_model_name_or_path:
            return self.pretrained_model_name_or_path
        return FLAVOUR_REPOS.get(self.model_flavour, self.model_flavour)

    def settings_hash(self, *keys: str) -> str:
        """A short stable hash of the named settings: the part of a cache key a setting owns.

        A setting added after keys were first made (`ADDED_LATER`) counts only when it differs
        from its default: adding one must not retrain or re-encode what users already have.
        """
        fields = type(self).model_fields
        values = {key: getattr(self, key) for key in sorted(keys)}
        values = {key: value for key, value in values.items()
                  if key not in ADDED_LATER or value != (fields[key].default if key in fields else None)}
        return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def settings_snapshot(config: ChromaConfig, extra_names: tuple[str, ...] = ()) -> str:
    """Every setting's value as canonical JSON: what a code location was built from, to compare later."""
    names = sorted({*type(config).model_fields, *extra_names})
    return json.dumps({name: getattr(config, name) for name in names}, sort_keys=True, default=str)


def changed_settings(before: str, after: str, shown: int = 60) -> dict[str, str]:
    """Setting -> "old → new" between two `settings_snapshot`s (values cut to `shown` characters)."""
    old, new = json.loads(before), json.loads(after)

    def short(value) -> str:
        text = json.dumps(value, default=str)
        return text if len(text) <= shown else text[: shown - 1] + "…"

    return {name: f"{short(old.get(name))} → {short(new.get(name))}"
            for name in sorted(old.keys() | new.keys()) if old.get(name) != new.get(name)}


def read_jsonc_file(path: Path, missing: str, invalid: str, error: type[Exception] = ConfigError):
    """A JSON/JSONC file's content; `missing` and `invalid` (followed by the parser's reason) say what went wrong."""
    if not path.is_file():
        raise error(missing)
    try:
        return parse_jsonc(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise error(f"{invalid}: {exc}") from None


def read_prompt_library(path: Path) -> list[str]:
    """SimpleTuner's prompt library: an object of name -> prompt or name -> {"prompt": ...}; a list of prompts too."""
    library = read_jsonc_file(path, f"user_prompt_library {path} is not a file; give a JSON file of name -> prompt",
                              f"user_prompt_library {path} is not valid JSON", error=ValueError)
    entries = list(library.values()) if isinstance(library, dict) else library
    if not isinstance(entries, list):
        entries = [None]
    prompts = [entry.get("prompt") if isinstance(entry, dict) else entry for entry in entries]
    extras = sorted({key for entry in entries if isinstance(entry, dict) for key in entry} - {"prompt"})
    if extras:
        warnings.warn(f"user_prompt_library {path}: only each entry's prompt is used; {', '.join(extras)} "
                      "ignored (one negative prompt for all: validation_negative_prompt)", stacklevel=3)
    if not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f'user_prompt_library {path} must be {{"name": "prompt", ...}}, {{"name": {{"prompt": "..."}}}} '
                         'or ["prompt", ...], with no empty prompt')
    return prompts


def known_config_keys() -> list[str]:
    return [*ChromaConfig.model_fields, *CONFIG_RULES]


def config_from_dict(values: dict[str, Any], source: str = "config") -> ChromaConfig:
    try:
        translated = translate(values, CONFIG_RULES, source, own_keys=set(ChromaConfig.model_fields))
        config = ChromaConfig(**translated.values)
    except SimpleTunerKeyError as exc:
        raise ConfigError(str(exc)) from None
    except ValidationError as exc:
        problems = "\n  ".join(describe_error(error) for error in exc.errors())
        raise ConfigError(f"{source}: invalid settings:\n  {problems}") from None
    if translated.mapped:
        warnings.warn(f"{source}: SimpleTuner keys read as ours: {'; '.join(translated.mapped)}", stacklevel=2)
    if translated.no_effect:
        warnings.warn(f"{source}: accepted, no effect here: {grouped(translated.no_effect)}", stacklevel=2)
    if config.unknown_keys:
        warnings.warn(
            f"{source}: unknown keys ignored: {did_you_mean(config.unknown_keys, known_config_keys())} "
            "(check the spelling; see README 'Config keys' and 'Coming from SimpleTuner')",
            stacklevel=2,
        )
    return config


def load_config(path: str | Path, **overrides: Any) -> ChromaConfig:
    """Read a JSON/JSONC config file; relative data and output paths resolve against its folder."""
    path = Path(path)
    values = read_jsonc_file(path, f"config file not found: {path} (run `chroma-demo` for an example, or set CHROMA_CONFIG)",
                             f"{path}: not valid JSON (comments are allowed)")
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be an object of key: value pairs")
    # SimpleTuner's config.json writes its keys as command-line flags ("--model_family").
    values = {str(key).removeprefix("--"): value for key, value in values.items()}
    values.update(overrides)
    # Written or defaulted, paths are relative to the config file; a relative path that is not
    # there but is under the working directory is read there, as SimpleTuner does.
    for key in ("instance_data_dir", "output_dir", "user_prompt_library", "init_lora", "data_backend_config"):
        value = values.get(key, ChromaConfig.model_fields[key].default)
        if isinstance(value, str):  # (None stays None)
            values[key] = resolve_path(value, path.parent, must_exist=key != "output_dir")
    if "datasets" in values:  # the dataloader list written inline
        values["datasets"] = dataset_entries(values["datasets"], f"{path}: `datasets`", path.parent)
    elif values.get("data_backend_config"):
        values["datasets"] = datasets_from_file(Path(values["data_backend_config"]), path.parent)
    config = config_from_dict(values, source=str(path))
    if config.init_lora and not Path(config.init_lora).is_file():
        raise ConfigError(f"{path}: `init_lora` = {config.init_lora!r} is not a file; give a pytorch_lora_weights.safetensors")
    output = Path(config.output_dir).resolve()
    for dataset in config.image_datasets:
        data = dataset.root.resolve()
        if dataset.type == "local" and output.is_relative_to(data):
            raise ConfigError(
                f"{path}: `output_dir` ({output}) is inside {dataset.describe()} ({data}); the pipeline's own "
                "files would look like dataset changes (and grid images like training images). Put output_dir beside "
                "the dataset."
            )
    return config


def resolve_path(value: str, config_dir: Path, must_exist: bool = True) -> str:
    """An absolute path for `value`: against the config's folder, else the working directory if it exists there."""
    given = Path(value).expanduser()
    if given.is_absolute():
        return str(given)
    beside_config = (config_dir / given).resolve()
    if must_exist and not beside_config.exists() and given.resolve().exists():
        return str(given.resolve())
    return str(beside_config)


def datasets_from_file(path: Path, config_dir: Path) -> list[dict]:
    """The image datasets of a SimpleTuner dataloader file, their folders made absolute."""
    entries = read_jsonc_file(
        path, f"`data_backend_config` = {str(path)!r} is not a file; give the path of your multidatabackend.json",
        f"data_backend_config {path}: not valid JSON")
    return dataset_entries(entries, f"data_backend_config {path}", config_dir)


def dataset_entries(entries, where: str, config_dir: Path) -> list[dict]:
    """Dataloader entries made ours (SimpleTuner's rules, notes as warnings), their paths made absolute."""
    try:
        entries, notes = image_entries(entries, where)
    except DataBackendError as exc:
        raise ConfigError(str(exc)) from None
    for note in notes:
        warnings.warn(f"{where}: {note}", stacklevel=4)
    for entry in entries:
        if isinstance(entry.get("instance_data_dir"), str):
            entry["instance_data_dir"] = resolve_path(entry["instance_data_dir"].rstrip("/"), config_dir)
        if entry.get("type") == "huggingface" and isinstance(entry.get("dataset_name"), str):
            local = resolve_path(entry["dataset_name"], config_dir)
            if Path(local).exists():  # a dataset saved to disk; otherwise a Hub id
                entry["dataset_name"] = local
        if isinstance(entry.get("parquet"), dict) and isinstance(entry["parquet"].get("path"), str):
            entry["parquet"] = {**entry["parquet"], "path": resolve_path(entry["parquet"]["path"], config_dir)}
    return entries
