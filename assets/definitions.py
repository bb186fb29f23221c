"""The Dagster code location: assets, resources, jobs and automation in one `Definitions`.

The config file comes from $CHROMA_CONFIG (default: the demo's `chroma-demo/config.jsonc`).
It is read when the code location loads, to give every asset a code version made of the
settings it reads: edit `learning_rate`, reload the code location, and Dagster shows
`lora_adapter` (only) as unsynced because its code version changed. A config that does not
load fails the code location with the reason.

The settings the code location loaded travel to every run worker as Dagster reconstruction
metadata (a worker imports this module afresh, so it would otherwise only see the file as
it is now). A run whose file changed since the load is refused before any work: its results
would be recorded under code versions that do not describe them, and the automation sensor
would then see them as unsynced on every tick.
"""

from __future__ import annotations

import functools
import os
import warnings
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from dagster import (
    AssetKey,
    AssetSelection,
    AssetSpec,
    AutomationConditionSensorDefinition,
    BetaWarning,
    DagsterInvalidDefinitionError,
    DefaultSensorStatus,
    Definitions,
    MetadataValue,
    PipesSubprocessClient,
    define_asset_job,
    definitions,
    get_dagster_logger,
    in_process_executor,
    map_asset_specs,
)

from chroma_pipeline.config import ChromaConfig, ConfigError, load_config, settings_snapshot
from resources import ArtifactStore, ChromaConfigResource, GPUResource

from . import ALL_ASSETS
from ._versions import ALL_STEP_SETTINGS, step_code_version
from .automation import on_unsynced
from .checks import ALL_CHECKS
from .dataset_folder import DATASET_FOLDER, dataset_folder
from .watch import build_retrain_schedule, dataset_scan, dataset_watch

DEFAULT_CONFIG = "chroma-demo/config.jsonc"
LOADED_SETTINGS = "chroma/loaded_settings"  # the reconstruction metadata key
CONFIG_NOTES = "config notes"  # the definition metadata entry holding what loading the config warned about
LOAD_LOG = get_dagster_logger("chroma_pipeline")
# Everything, the observed folder included: a full run observes the folder before it scans it.
EVERYTHING = AssetSelection.assets(DATASET_FOLDER) | AssetSelection.all()
IN_PROCESS_JOB = "__ephemeral_asset_job__"  # the name dagster.materialize gives its job, kept for the run list


def make_resources(config_path: str | None = None, device: str | None = None) -> dict:
    return {
        "chroma": ChromaConfigResource(config_path=config_path or os.environ.get("CHROMA_CONFIG", DEFAULT_CONFIG)),
        "gpu": GPUResource(device=device or os.environ.get("CHROMA_DEVICE", "auto")),
        "store": ArtifactStore(),
        "pipes": PipesSubprocessClient(),  # multi-process training (num_processes > 1)
    }


def chain_assets(config: ChromaConfig, notes: list[str] = ()) -> list:
    """The assets with code versions from `config` and the automation condition on every derived asset.

    `notes` (what loading the config warned about) go into every asset's definition metadata, so
    the UI shows them on whichever asset you open, before any run.
    """

    def configure(spec: AssetSpec) -> AssetSpec:
        step = spec.key.path[0]
        condition = None if step == "raw_dataset" else on_unsynced()  # the scan is started by a person
        spec = spec.replace_attributes(code_version=step_code_version(config, step), automation_condition=condition)
        return spec.merge_attributes(metadata={CONFIG_NOTES: MetadataValue.text("\n".join(notes))}) if notes else spec

    return map_asset_specs(configure, ALL_ASSETS)


def chain_jobs() -> list:
    lora, grid = AssetKey("lora_adapter"), AssetKey("validation_grid")
    return [
        define_asset_job("full_chain", EVERYTHING, description="folder observation and dataset scan to validation grid"),
        define_asset_job(
            "caption_branch",
            AssetSelection.assets(AssetKey("text_embeddings")).downstream(),
            description="after caption edits: embeddings, adapter, grid (latents and base model untouched)",
        ),
        define_asset_job(
            "image_branch",
            AssetSelection.assets(AssetKey("image_latents")).downstream(),
            description="after image edits: latents, adapter, grid",
        ),
        define_asset_job(
            "retrain_from_caches", AssetSelection.assets(lora, grid),
            description="train on the cached latents, embeddings and base model (reused if nothing changed), then the grid",
        ),
        define_asset_job(
            "validation_only", AssetSelection.assets(AssetKey("text_embeddings"), grid),
            description="render the grid of the current adapter (prompt embeddings first: a new prompt needs one)",
        ),
        dataset_scan,
    ]


def load_config_noting(config_path: str) -> tuple[ChromaConfig, list[str]]:
    """The config, and its notes (unknown keys, SimpleTuner keys read as ours, ...), each logged once.

    Logged here, when the code location loads, they show in `dagster dev`'s terminal (and
    `dagster definitions validate`'s output) as soon as the file is read, not only in a run's log.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every note, even one this process printed before
        config = load_config(config_path)
    notes = list(dict.fromkeys(str(warning.message) for warning in caught))
    for note in notes:
        LOAD_LOG.warning(note)
    return config, notes


def build_definitions(config_path: str | None = None, device: str | None = None,
                      loaded_settings: str | None = None) -> Definitions:
    """The code location; `loaded_settings` is the settings it counts as loaded (None: the file as it is now)."""
    resources = make_resources(config_path, device)
    # A config that does not load fails the code location with the reason: guessing code
    # versions instead would make every asset look unsynced and start runs bound to fail.
    config, notes = load_config_noting(resources["chroma"].config_path)
    loaded_settings = loaded_settings or settings_snapshot(config, ALL_STEP_SETTINGS)
    # A new instance, not model_copy: Dagster rebuilds a resource from its constructor's arguments.
    resources["chroma"] = ChromaConfigResource(config_path=resources["chroma"].config_path, loaded_settings=loaded_settings)
    try:
        ZoneInfo(config.retrain_timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"`retrain_timezone` = {config.retrain_timezone!r} is not a time zone; e.g. 'UTC' or 'Europe/Madrid'"
        ) from None
    try:  # Dagster checks the cron string when the schedule is defined; the time zone is known good by now
        retrain = build_retrain_schedule(config)
    except DagsterInvalidDefinitionError:
        raise ConfigError(
            f"`retrain_cron` = {config.retrain_cron!r} is not a cron string; e.g. '0 3 * * *' (03:00 daily)"
        ) from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BetaWarning)  # use_user_code_server is beta; chosen knowingly
        automation = AutomationConditionSensorDefinition(
            "chroma_automation",
            target=AssetSelection.all(),
            default_status=DefaultSensorStatus.RUNNING,  # Dagster's own default sensor starts stopped
            minimum_interval_seconds=30,
            use_user_code_server=True,  # our condition asks Dagster's stale-status resolver, in user code
            description="re-materializes what Dagster shows as unsynced or missing, and nothing else",
        )
    # One process for the whole run: the VAE, T5 and the transformer must not be loaded side
    # by side by parallel steps, and every step runs on the same accelerator anyway.
    return Definitions(
        assets=[dataset_folder, *chain_assets(config, notes)], asset_checks=ALL_CHECKS, resources=resources,
        jobs=chain_jobs(), sensors=[automation, dataset_watch], schedules=[retrain],
        executor=in_process_executor,
    )


def materialize_chain(config_path: str, instance, selection=None, device: str | None = None, loggers=None,
                      run_config=None, **kwargs):
    """Materialize (part of) the chain in-process, with the code versions the code location would give.

    Without a selection, the whole chain as `full_chain` runs it: the folder is observed first.
    It does what `dagster.materialize` does, which cannot take `loggers`: they replace Dagster's
    console logger (e.g. {"console": brief_console}).
    """
    definitions = build_definitions(config_path, device)
    job = Definitions(
        assets=[*definitions.assets, *definitions.asset_checks], resources=definitions.resources, loggers=loggers,
        jobs=[define_asset_job(IN_PROCESS_JOB, EVERYTHING if selection is None else selection)],
    ).resolve_job_def(IN_PROCESS_JOB)
    if loggers:  # a run config without a `loggers` section gets Dagster's default console logger
        run_config = {**(run_config or {}), "loggers": {name: {} for name in loggers}}
    return job.execute_in_process(run_config=run_config, instance=instance, **kwargs)


@definitions
def defs() -> Definitions:
    """Loaded when Dagster loads the code location, not when this module is imported."""
    return _location_definitions()


@functools.cache
def _location_definitions() -> Definitions:
    """The code location, built once per process.

    Dagster calls `defs` twice per load (to find it, then to build the repository); one build
    reads the config once and logs its notes once. A reload starts a new process.

    A run worker imports this module afresh, so on its own it would see the config file as it
    is now. Dagster carries "reconstruction metadata" from the code server's load to each run's
    worker (in the execution plan): the settings loaded travel that way, and the worker refuses
    the run if the file changed since. The load context is Dagster's own; it is not exported
    at the package's top level.
    """
    from dagster._core.definitions.definitions_load_context import DefinitionsLoadContext, DefinitionsLoadType

    context = DefinitionsLoadContext.get()
    if context.load_type == DefinitionsLoadType.RECONSTRUCTION:
        return build_definitions(loaded_settings=context.reconstruction_metadata.get(LOADED_SETTINGS))
    loaded = build_definitions()
    context.add_to_pending_reconstruction_metadata(LOADED_SETTINGS, loaded.resources["chroma"].loaded_settings)
    return loaded
