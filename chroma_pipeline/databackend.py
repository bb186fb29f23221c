"""Image datasets: SimpleTuner's dataloader file (`data_backend_config`) or the one-folder shorthand.

A SimpleTuner user's `multidatabackend.json` is a list of datasets, each with its own folder
(or Hugging Face dataset), resolution, crop, caption strategy, `repeats` and `probability`,
plus one `dataset_type: text_embeds` entry. Each image dataset becomes an `ImageDataset`;
a setting a dataset leaves out falls back to the main config's value, as in SimpleTuner.

Samples are named `<dataset id>/<path in the dataset>`. The one-folder shorthand
(`instance_data_dir` in the main config) is the dataset with the empty id, whose samples
keep their plain paths, so its caches stay valid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .buckets import bucket_for
from .simpletuner import DATASET_RULES, SimpleTunerKeyError, grouped, translate

SHORTHAND_ID = ""

# What SimpleTuner gives a dataloader entry that leaves these out (unless the main config sets them).
ENTRY_DEFAULTS = {"crop": False, "crop_style": "random", "crop_aspect": "square", "caption_strategy": "filename"}

# The dataset settings each step reads, so that a change re-runs exactly the steps that read it.
SCAN_KEYS = ("type", "instance_data_dir", "dataset_name", "split", "revision", "image_column", "caption_column",
             "resolution", "resolution_type", "minimum_image_size", "maximum_upscale", "minimum_aspect_ratio",
             "maximum_aspect_ratio", "crop_aspect", "caption_strategy", "instance_prompt", "prepend_instance_prompt",
             "parquet", "metadata_file", "metadata_file_column", "metadata_caption_column", "caption_fallback")
FRAMING_KEYS = ("resolution", "resolution_type", "crop", "crop_style", "crop_aspect")
MIX_KEYS = ("repeats", "probability")

# Dataset settings that fall back to the main config's key of the same name.
INHERITED = ("resolution", "resolution_type", "minimum_image_size", "maximum_upscale", "crop", "crop_style",
             "crop_aspect", "caption_strategy", "metadata_file", "metadata_file_column", "metadata_caption_column",
             "caption_fallback", "instance_prompt", "prepend_instance_prompt", "repeats")


class ParquetCaptions(BaseModel):
    """SimpleTuner's `parquet` block: a table naming each image and its caption."""

    model_config = ConfigDict(extra="allow", frozen=True)
    path: str
    filename_column: str = "filename"
    caption_column: str = "caption"
    fallback_caption_column: str | None = None
    identifier_includes_extension: bool = False


class ImageDataset(BaseModel):
    """One image dataset, with SimpleTuner's key names. None means "the main config's value"."""

    model_config = ConfigDict(extra="allow", frozen=True)

    id: str = Field(pattern=r"^[^/\\]*$")  # the first part of its samples' paths
    type: Literal["local", "huggingface"] = "local"
    instance_data_dir: str | None = None
    # type huggingface: a dataset saved with `save_to_disk` (a folder) or a Hub id.
    dataset_name: str | None = None
    split: str = "train"
    revision: str | None = None
    image_column: str = "image"
    caption_column: str | list[str] = "text"
    resolution: float | None = Field(None, gt=0)
    resolution_type: Literal["pixel", "area", "pixel_area"] | None = None
    minimum_image_size: float | None = Field(None, ge=0)
    maximum_upscale: float | None = Field(None, ge=1)
    minimum_aspect_ratio: float | None = Field(None, gt=0)  # width / height
    maximum_aspect_ratio: float | None = Field(None, gt=0)
    crop: bool | None = None
    crop_style: Literal["center", "centre", "random", "corner"] | None = None
    crop_aspect: Literal["preserve", "square"] | None = None
    caption_strategy: Literal["auto", "textfile", "metadata", "filename", "instanceprompt", "parquet",
                              "huggingface"] | None = None
    instance_prompt: str | None = None
    prepend_instance_prompt: bool | None = None
    parquet: ParquetCaptions | None = None
    metadata_file: str | None = None
    metadata_file_column: str | None = None
    metadata_caption_column: str | None = None
    caption_fallback: Literal["skip", "filename", "empty"] | None = None
    repeats: int | None = Field(None, ge=0)
    probability: float = Field(1.0, gt=0)

    @field_validator("crop_style")
    @classmethod
    def _one_spelling(cls, value):
        return "center" if value == "centre" else value

    def setting(self, key: str, config):
        """This dataset's value of a setting. Left out of the entry, it is the main config's when the
        main config sets it, else SimpleTuner's default for a dataloader entry, else ours."""
        value = getattr(self, key)
        if value is not None:
            return value
        from_main_config = getattr(config, key, None)
        if self.id == SHORTHAND_ID or key in config.model_fields_set or key not in ENTRY_DEFAULTS:
            return from_main_config
        if key == "crop_aspect" and not self.setting("crop", config):
            return "preserve"  # without a crop, an image keeps its aspect ratio in its bucket
        if key == "caption_strategy" and self.type == "huggingface":
            return "huggingface"  # the dataset's caption column
        return ENTRY_DEFAULTS[key]

    def settings(self, keys: tuple[str, ...], config) -> dict:
        """The values of `keys` as this dataset uses them (for cache keys: written or defaulted, the same)."""
        values = {key: self.setting(key, config) if key in INHERITED or key in ENTRY_DEFAULTS else getattr(self, key)
                  for key in keys}
        return {key: value.model_dump() if isinstance(value, BaseModel) else value for key, value in values.items()}

    def bucket(self, width: int, height: int, config) -> tuple[int, int]:
        """The training bucket of a width x height image in this dataset."""
        return bucket_for(width, height, self.setting("resolution", config), self.setting("resolution_type", config),
                          self.setting("crop_aspect", config))

    @property
    def root(self) -> Path:
        return Path(self.instance_data_dir or self.dataset_name or ".")

    def describe(self) -> str:
        return f"dataset {self.id!r}" if self.id else "`instance_data_dir`"


def sample_path(dataset_id: str, relative: str) -> str:
    return f"{dataset_id}/{relative}" if dataset_id else relative


def dataset_of(path: str, named: bool) -> tuple[str, str]:
    """(dataset id, path inside the dataset) of a sample path; `named`: the config has named datasets."""
    if not named:
        return SHORTHAND_ID, path
    dataset_id, _, relative = path.partition("/")
    return dataset_id, relative


class DataBackendError(ValueError):
    pass


def image_entries(entries, where: str) -> tuple[list[dict], list[str]]:
    """The image dataset entries of a SimpleTuner dataloader list, and notes on what was set aside.

    Disabled entries and the `text_embeds` / `image_embeds` entries are left out with a note:
    this pipeline keys its caches by content under `output_dir`, so their cache folders are
    not needed. Each entry's keys go through SimpleTuner's dataset rules (simpletuner.py).
    """
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise DataBackendError(f"{where}: must be a list of dataset objects, as SimpleTuner writes it")
    images, notes, no_effect = [], [], {}
    for number, entry in enumerate(entries):
        name = entry.get("id", f"entry {number}")
        kind = entry.get("dataset_type", "image")
        if entry.get("disabled") or entry.get("disable"):
            notes.append(f"dataset {name!r} is disabled: skipped")
            continue
        if kind in ("text_embeds", "image_embeds"):
            no_effect[f"{name} ({kind})"] = "caches live under output_dir, keyed by content"
            continue
        if kind != "image":
            raise DataBackendError(
                f"{where}: dataset {name!r} has dataset_type {kind!r}; only image datasets "
                "(and the text_embeds / image_embeds entries, which are not needed here) are read"
            )
        if not isinstance(entry.get("id"), str) or not entry["id"] or "/" in entry["id"]:
            raise DataBackendError(f"{where}: entry {number} needs an `id`: a name without '/', "
                                   f"unique in the file (got {entry.get('id')!r})")
        # SimpleTuner reads a Hugging Face dataset's keys at the top level or in a `huggingface` block.
        nested = entry.get("huggingface") if isinstance(entry.get("huggingface"), dict) else {}
        merged = {**{k: v for k, v in nested.items() if k in HF_KEYS}, **entry}
        merged = {k: v for k, v in merged.items() if k not in ("dataset_type", "disabled", "disable", "huggingface")}
        if merged.get("only_instance_prompt"):
            merged["caption_strategy"] = "instanceprompt"
        merged.pop("only_instance_prompt", None)
        try:
            translated = translate(merged, DATASET_RULES, f"{where}: dataset {name!r}",
                                   own_keys=set(ImageDataset.model_fields))
        except SimpleTunerKeyError as exc:
            raise DataBackendError(str(exc)) from None
        try:
            dataset = ImageDataset(**translated.values)
        except ValidationError as exc:
            problems = "; ".join(describe_error(error) for error in exc.errors())
            raise DataBackendError(f"{where}: dataset {name!r}: {problems}") from None
        if dataset.model_extra:
            known = [*ImageDataset.model_fields, *DATASET_RULES]
            notes.append(f"dataset {name!r}: unknown keys ignored: {did_you_mean(sorted(dataset.model_extra), known)} "
                         "(check the spelling; see README 'Coming from SimpleTuner')")
        folder_key = {"local": "instance_data_dir", "huggingface": "dataset_name"}[dataset.type]
        if not getattr(dataset, folder_key):
            raise DataBackendError(f"{where}: dataset {name!r} (type {dataset.type}) needs `{folder_key}`")
        no_effect.update({f"{name}: {key}": reason for key, reason in translated.no_effect.items()})
        notes += [f"dataset {name!r}: {line}" for line in translated.mapped]
        images.append(translated.values)
    if no_effect:
        notes.append("accepted, no effect here: " + grouped(no_effect))
    ids = [e["id"] for e in images]
    if len(set(ids)) != len(ids):
        raise DataBackendError(f"{where}: dataset ids must be unique (got {ids})")
    if not images:
        raise DataBackendError(f"{where}: no enabled image dataset")
    return images, notes


def did_you_mean(unknown: list[str], known: list[str]) -> str:
    """'repeat (did you mean repeats?), foo': unknown keys with the nearest known one where there is one."""
    import difflib

    named = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=1)
        named.append(f"{key} (did you mean {close[0]}?)" if close else key)
    return ", ".join(named)


def describe_error(error: dict) -> str:
    """One pydantic error as "`key` = value: what is allowed"."""
    message = error["msg"].removeprefix("Value error, ")
    if not error["loc"]:  # a rule over several settings: its message names them, the input is the whole config
        return message
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "literal_error":
        return f"`{key}` = {error.get('input')!r} is not allowed; allowed values: {error['ctx']['expected']}"
    return f"`{key}` = {error.get('input')!r}: {message}"


HF_KEYS = ("dataset_name", "split", "revision", "image_column", "caption_column")
