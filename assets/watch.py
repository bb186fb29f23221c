"""Noticing dataset changes: a folder watcher that records them, a schedule that retrains on them.

The watcher (`dataset_watch`, on by default) only records: it observes `dataset_folder`,
so the UI shows the scan as unsynced the moment a caption is saved, and nothing runs. It
also watches the config file: a setting changed since the code location loaded is recorded
once, on each asset that reads it, as "config changed: reload the code location" (runs
are refused until the reload, see resources/chroma_config.py).

The schedule (`nightly_retrain`, off until you turn it on) acts: at its cron time it
compares the folder with what the last scan read. Unchanged: no run at all. Changed:
one scan run; `chroma_automation` then carries the change through exactly the assets
Dagster calls unsynced (a caption edit: its embedding, the adapter, the grid). Dagster's
staleness is one level deep, so the schedule cannot name those assets before the scan
has produced new data versions; the automation sensor can, one level at a time.
"""

from __future__ import annotations

import hashlib

from dagster import (
    AssetKey,
    AssetObservation,
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

from chroma_pipeline.config import ChromaConfig, ConfigError
from chroma_pipeline.fingerprint import fingerprint_config_datasets
from resources import ArtifactStore, ChromaConfigResource

from ._versions import STEP_SETTINGS, steps_reading
from .dataset_folder import DATASET_FOLDER, observe_if_changed
from .raw_dataset import CAPTIONS, IMAGES

RELOAD_ADVICE = "reload the code location (Deployment > Reload, or restart dagster dev); until then runs are refused"

# The folder is observed in the same run, just before the scan: the scan's lineage then
# names the folder content it read, and the watcher's next tick has nothing new to record.
dataset_scan = define_asset_job(
    "dataset_scan", AssetSelection.assets(DATASET_FOLDER, IMAGES, CAPTIONS),
    description="observe the dataset folder, then scan it (what the schedule runs)",
)


def step_assets(step: str) -> list[AssetKey]:
    return [IMAGES, CAPTIONS] if step == "raw_dataset" else [AssetKey(step)]


def config_change_notes(changes: dict[str, str]) -> list[AssetObservation]:
    """One observation per asset whose code version the changed settings are part of."""
    notes = []
    for step in steps_reading(changes):
        mine = {name: change for name, change in changes.items() if name in STEP_SETTINGS[step]}
        text = "; ".join(f"{name}: {change}" for name, change in mine.items())
        notes += [AssetObservation(key, metadata={"config changed: reload the code location": f"{text} ({RELOAD_ADVICE})"})
                  for key in step_assets(step)]
    return notes


@sensor(name="dataset_watch", minimum_interval_seconds=60, default_status=DefaultSensorStatus.RUNNING,
        description="records a dataset_folder observation when the folder's content changes, and notes a config "
                    "file changed since the code location loaded (runs nothing)")
def dataset_watch(context: SensorEvaluationContext, chroma: ChromaConfigResource, store: ArtifactStore):
    try:
        config = chroma.load()  # notes are logged at load and in runs, not on every tick
        changes = chroma.changes_since_load(config)
    except ConfigError as error:  # mid-edit, perhaps: say so, and look again next tick
        return SkipReason(f"the config file does not load ({error}); runs will fail until it does")
    events, said = [], []
    # Each distinct change is noted once: the cursor remembers the last one recorded.
    change_id = hashlib.sha256(repr(sorted(changes.items())).encode()).hexdigest()[:16] if changes else None
    if changes:
        said.append(f"config changed since the code location loaded ({', '.join(changes)}): {RELOAD_ADVICE}")
        if change_id != context.cursor:
            events += config_change_notes(changes)
    _fingerprint, observation = observe_if_changed(context.instance, config, store.layout(config))
    if observation is not None:
        changed = observation.metadata["changes since last observation"].value
        events.append(observation)
        said.append(f"dataset folder changed: {changed}; recorded on dataset_folder, so the scan shows as unsynced")
    else:
        said.append("dataset folder unchanged")
    for line in said:
        context.log.info(line)
    return SensorResult(asset_events=events, skip_reason="; ".join(said), cursor=change_id)


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
        config = chroma.load()  # notes are logged at load and in runs, not on every tick
        fingerprint = fingerprint_config_datasets(config, store.layout(config).dataset_memo)
        if fingerprint.version == last_scanned_fingerprint(context.instance):
            return SkipReason(f"the dataset ({len(fingerprint.files)} files) has not changed since the last scan")
        return RunRequest(tags={"chroma/dataset_fingerprint": fingerprint.version})

    return nightly_retrain
