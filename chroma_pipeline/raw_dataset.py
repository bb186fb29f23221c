"""Step `raw_dataset`: scan the dataset folder into a manifest, with separate image and caption versions."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from .config import ChromaConfig
from .databackend import ImageDataset, sample_path
from .dataset import ManifestRow, ScanOptions, duplicate_reason, read_manifest, reason_group, scan_dataset, usable, write_manifest
from .errors import DatasetError
from .layout import Layout, StepResult
from .sources import scan_huggingface
from .storage import combine_hashes

# output_dir belongs to every step: pointing it elsewhere leaves all artifacts to be made again.
SETTINGS = (
    "output_dir", "instance_data_dir", "caption_strategy", "metadata_file", "metadata_file_column",
    "metadata_caption_column", "caption_fallback", "minimum_image_size", "resolution_type", "alpha_background",
    "maximum_upscale", "resolution", "crop_aspect", "instance_prompt", "prepend_instance_prompt", "dataset_scan",
)


@dataclass
class DatasetVersions:
    """raw_dataset has two faces with separate versions, so a caption edit never invalidates latents."""

    images: str  # which pixels are in which file: caption edits leave it alone
    captions: str  # which caption is in which file: image edits leave it alone


def scan_options(config: ChromaConfig, dataset: ImageDataset) -> ScanOptions:
    """How to scan one dataset: its own settings, else the main config's."""
    strategy = dataset.setting("caption_strategy", config)
    table = dataset.parquet
    return ScanOptions(
        caption_strategy=strategy, instance_prompt=dataset.setting("instance_prompt", config),
        metadata_file=dataset.setting("metadata_file", config),
        metadata_file_column=table.filename_column if table else dataset.setting("metadata_file_column", config),
        metadata_caption_column=table.caption_column if table else dataset.setting("metadata_caption_column", config),
        caption_table=table.path if table else None,
        caption_table_fallback_column=table.fallback_caption_column if table else None,
        caption_table_names_have_extension=table.identifier_includes_extension if table else False,
        caption_fallback=dataset.setting("caption_fallback", config),
        minimum_image_size=dataset.setting("minimum_image_size", config),
        resolution_type=dataset.setting("resolution_type", config), alpha_background=config.alpha_background,
        resolution=dataset.setting("resolution", config), crop_aspect=dataset.setting("crop_aspect", config),
        maximum_upscale=dataset.setting("maximum_upscale", config),
        minimum_aspect_ratio=dataset.minimum_aspect_ratio, maximum_aspect_ratio=dataset.maximum_aspect_ratio,
        prepend_instance_prompt=dataset.setting("prepend_instance_prompt", config),
    )


def scan_one(config: ChromaConfig, dataset: ImageDataset, layout: Layout | None = None) -> list[ManifestRow]:
    options = scan_options(config, dataset)
    if options.caption_strategy == "instanceprompt" and not options.instance_prompt:
        raise DatasetError(f"{dataset.describe()}: caption_strategy 'instanceprompt' needs `instance_prompt`, "
                         "the caption every image gets")
    if dataset.type == "huggingface":
        rows = scan_huggingface(dataset, options)
    elif not dataset.root.is_dir():
        raise FileNotFoundError(
            f"{dataset.describe()}: {dataset.root} is not a folder; set `instance_data_dir` in "
            f"{config.data_backend_config or 'the config'} to the folder of its images (a relative path is read beside "
            "the config file, else under the working directory)"
        )
    else:
        rows = scan_dataset(dataset.root, options, layout.image_facts(dataset.id) if layout else None)
    for row in rows:
        row.path, row.dataset = sample_path(dataset.id, row.path), dataset.id
    name_duplicates_by_sample_path(rows, dataset.id)
    return rows


def name_duplicates_by_sample_path(rows: list[ManifestRow], dataset_id: str) -> None:
    """A duplicate's reason names its twin and itself as the manifest does, `<dataset id>/<path>`."""
    kept_rows = {row.path: row for row in rows if row.status == "ok"}
    for row in rows:
        if row.duplicate_of:
            row.duplicate_of = sample_path(dataset_id, row.duplicate_of)
            row.skip_reason = duplicate_reason(kept_rows[row.duplicate_of], row.path, row.caption)


def no_usable_sample_message(dataset: ImageDataset, rows: list[ManifestRow]) -> str:
    """Why a dataset has nothing to train on: the count of each reason, and what to do about the first ones."""
    reasons = Counter(reason_group(row.skip_reason) for row in rows)
    detail = ", ".join(f"{n} {reason}" for reason, n in reasons.items()) or "no image files found"
    advice = []
    if "no caption" in reasons or not rows:
        advice.append("Each image needs a caption: a file with the same name and a .txt suffix (photo.jpg -> "
                      "photo.txt), a metadata table, or a caption_strategy of filename or instanceprompt.")
    other = next((row for row in rows if reason_group(row.skip_reason) != "no caption"), None)
    if other is not None:  # e.g. every image too small for the resolution: the reason names the key to change
        label = "First file skipped for another reason" if "no caption" in reasons else "First skipped file"
        advice.append(f"{label}: {other.path}: {other.skip_reason}.")
    return f"no usable sample in {dataset.describe()} ({dataset.root}: {detail}). " + " ".join(advice)


def _manifest_holds(layout: Layout, rows: list[ManifestRow]) -> bool:
    try:
        return layout.manifest.is_file() and read_manifest(layout.manifest) == rows
    except (OSError, ValueError, TypeError):  # unreadable, or written by an older version: write it again
        return False


def build_manifest(config: ChromaConfig, layout: Layout) -> tuple[StepResult, list[ManifestRow]]:
    # Duplicates are looked for inside each dataset only: the same folder listed twice at two
    # resolutions (SimpleTuner's multi-resolution recipe) is two datasets, not duplicates.
    rows = [row for dataset in config.image_datasets for row in scan_one(config, dataset, layout)]
    ok = usable(rows)
    empty = [d for d in config.image_datasets if not any(r.dataset == d.id for r in ok)]
    if empty:
        raise DatasetError(no_usable_sample_message(empty[0], [row for row in rows if row.dataset == empty[0].id]))
    if not _manifest_holds(layout, rows):  # a no-op re-scan writes nothing
        write_manifest(rows, layout.manifest)
    versions = DatasetVersions(
        images=combine_hashes(*sorted(f"{r.path}:{r.image_sha256}" for r in ok)),
        captions=combine_hashes(*sorted(f"{r.path}:{r.caption_sha256}" for r in ok)),
    )
    stats = {"samples": len(ok), "skipped": len(rows) - len(ok), "versions": versions}
    return StepResult(combine_hashes(versions.images, versions.captions), layout.manifest, stats), rows
