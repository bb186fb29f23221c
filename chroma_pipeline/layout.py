"""Where every artifact lives under `output_dir`, and what a step hands back."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / "dataset" / "manifest.parquet"

    @property
    def dataset_memo(self) -> Path:
        """File hashes remembered by stat, so watching the folder does not re-read every image."""
        return self.root / "dataset" / "file_hashes.json"

    def image_facts(self, dataset_id: str) -> Path:
        """What decoding and hashing each image found, remembered by stat, so a re-scan decodes only changes."""
        return self.root / "dataset" / f"image_facts{'.' + dataset_id if dataset_id else ''}.json"

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

    @property
    def checks_dir(self) -> Path:
        """Answers of checks on immutable artifacts, so an unchanged re-run does not check twice."""
        return self.root / "checks"

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
    """What a step made: `data_version` is a hash of exactly what decides its content."""

    data_version: str
    path: Path
    stats: dict = field(default_factory=dict)
