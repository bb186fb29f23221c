"""Noticing dataset changes: a folder watcher that records them, a schedule that retrains on them.

The watcher (`dataset_watch`, on by default) only records: it observes `dataset_folder`,
so the UI shows the scan as unsynced the moment a caption is saved, and nothing runs.

The schedule (`nightly_retrain`, off until you turn it on) acts: at its cron time it
compares the folder with what the last scan read. Unchanged: no run at all. Changed:
one scan run; `chroma_automation` then carries the change through exactly the assets
Dagster calls unsynced (a caption edit: its embedding, the adapter, the grid). Dagster's
staleness is one level deep, so the schedule cannot name those assets before the scan
has produced new data versions; the automation sensor can, one level at a time.
"""

from __future__ import annotations

from dagster import (
    AssetSelection,
    DagsterInstance,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    RunRequest,
    ScheduleEvaluationContext,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    define_asset_job,
    schedule,
    sensor,
)

from chroma_pipeline.config import ChromaConfig
from chroma_pipeline.fingerprint import fingerprint_config_datasets
from resources import ArtifactStore, ChromaConfigResource

from .dataset_folder import DATASET_FOLDER, observe_if_changed
from .raw_dataset import CAPTIONS, IMAGES

# The folder is observed in the same run, just before the scan: the scan's lineage then
# names the folder content it read, and the watcher's next tick has nothing new to record.
dataset_scan = define_asset_job(
    "dataset_scan", AssetSelection.assets(DATASET_FOLDER, IMAGES, CAPTIONS),
    description="observe the dataset folder, then scan it (what the schedule runs)",
)


@sensor(name="dataset_watch", minimum_interval_seconds=60, default_status=DefaultSensorStatus.RUNNING,
        description="records a dataset_folder observation when the folder's content changes (runs nothing)")
def dataset_watch(context: SensorEvaluationContext, chroma: ChromaConfigResource, store: ArtifactStore):
    config = chroma.load(context.log)
    _fingerprint, observation = observe_if_changed(context.instance, config, store.layout(config))
    if observation is None:
        return SkipReason("dataset folder unchanged")
    context.log.info(f"dataset folder changed: {observation.metadata['changes since last observation'].value}")
    return SensorResult(asset_events=[observation])


def last_scanned_fingerprint(instance: DagsterInstance) -> str | None:
    records = instance.fetch_materializations(IMAGES, limit=1).records
    if not records:
        return None
    entry = records[0].asset_materialization.metadata.get("dataset fingerprint")
    return entry.value if entry is not None else None


def build_retrain_schedule(config: ChromaConfig):
    status = DefaultScheduleStatus.RUNNING if config.retrain_schedule_enabled else DefaultScheduleStatus.STOPPED

    @schedule(
        name="nightly_retrain", job=dataset_scan, cron_schedule=config.retrain_cron,
        execution_timezone=config.retrain_timezone, default_status=status,
        description=f"at `{config.retrain_cron}` ({config.retrain_timezone}): re-scan when the dataset changed; "
                    "chroma_automation retrains what that makes unsynced",
    )
    def nightly_retrain(context: ScheduleEvaluationContext, chroma: ChromaConfigResource, store: ArtifactStore):
        config = chroma.load(context.log)
        fingerprint = fingerprint_config_datasets(config, store.layout(config).dataset_memo)
        if fingerprint.version == last_scanned_fingerprint(context.instance):
            return SkipReason(f"the dataset ({len(fingerprint.files)} files) has not changed since the last scan")
        return RunRequest(tags={"chroma/dataset_fingerprint": fingerprint.version})

    return nightly_retrain
