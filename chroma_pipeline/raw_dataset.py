"""Step `raw_dataset`: scan the dataset folder into a manifest, with separate image and caption versions."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .config import ChromaConfig
from .dataset import ManifestRow, ScanOptions, scan_dataset, usable, write_manifest
from .layout import Layout, StepResult
from .storage import combine_hashes

# output_dir belongs to every step: pointing it elsewhere leaves all artifacts to be made again.
SETTINGS = (
    "output_dir", "instance_data_dir", "caption_strategy", "metadata_file", "metadata_file_column",
    "metadata_caption_column", "caption_fallback", "minimum_image_size", "resolution_type", "alpha_background",
    "maximum_upscale", "resolution", "crop_aspect",
)


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
