"""`dataset_folder`: the user's folder of images and captions, as Dagster observes it.

It is an observable source asset whose data version is the folder's content fingerprint.
When the folder watcher (or the "Observe" button) records a new fingerprint, Dagster
shows both `raw_dataset` assets as unsynced, without anyone running anything. The jobs
that scan (`dataset_scan`, `full_chain`) observe the folder first, in the same run, so the
scan's lineage names the folder content it read.
"""

from __future__ import annotations

import json
import warnings

from dagster import AssetKey, AssetObservation, DagsterInstance, DataVersion, ObserveResult, observable_source_asset

from chroma_pipeline.config import ChromaConfig
from chroma_pipeline.fingerprint import Fingerprint, fingerprint_config_datasets, summarize
from chroma_pipeline.layout import Layout
from chroma_pipeline.storage import write_json_atomic
from resources import ArtifactStore, ChromaConfigResource

from ._dagster_tags import DATA_VERSION_TAG

DATASET_FOLDER = AssetKey("dataset_folder")
warnings.filterwarnings("ignore", message="Function `observable_source_asset` is currently in beta")


def _observation_metadata(fingerprint: Fingerprint, layout: Layout) -> dict:
    previous = json.loads(layout.dataset_observed.read_text()) if layout.dataset_observed.is_file() else {}
    changes = fingerprint.changes_since(previous)
    return {
        "files": len(fingerprint.files),
        "changes since last observation": summarize(changes),
        "modified": len(changes["modified"]),
        "added": len(changes["added"]),
        "removed": len(changes["removed"]),
        "files re-read": fingerprint.hashed,
    }


def _remember(fingerprint: Fingerprint, layout: Layout) -> None:
    layout.dataset_observed.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(layout.dataset_observed, fingerprint.files)


def latest_observed_version(instance: DagsterInstance) -> str | None:
    records = instance.fetch_observations(DATASET_FOLDER, limit=1).records
    if not records:
        return None
    return records[0].asset_observation.data_version


def observe_if_changed(
    instance: DagsterInstance, config: ChromaConfig, layout: Layout
) -> tuple[Fingerprint, AssetObservation | None]:
    """The folder's fingerprint, and an observation to record when it differs from the last one recorded."""
    fingerprint = fingerprint_config_datasets(config, layout.dataset_memo)
    if fingerprint.version == latest_observed_version(instance):
        return fingerprint, None
    observation = AssetObservation(
        asset_key=DATASET_FOLDER,
        tags={DATA_VERSION_TAG: fingerprint.version},  # a sensor's observation carries its version only as this tag
        metadata=_observation_metadata(fingerprint, layout),
    )
    _remember(fingerprint, layout)
    return fingerprint, observation


@observable_source_asset(
    name="dataset_folder", group_name="chroma",
    description="The images, caption files and metadata tables under `instance_data_dir`, by content.",
)
def dataset_folder(context, chroma: ChromaConfigResource, store: ArtifactStore) -> ObserveResult:
    config = chroma.load()  # its notes went to the run's log when the resource was set up
    layout = store.layout(config)
    fingerprint = fingerprint_config_datasets(config, layout.dataset_memo)
    metadata = _observation_metadata(fingerprint, layout)
    _remember(fingerprint, layout)
    return ObserveResult(data_version=DataVersion(fingerprint.version), metadata=metadata)
