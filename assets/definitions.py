"""The Dagster code location: assets, resources, jobs and automation in one `Definitions`.

The config file comes from $CHROMA_CONFIG (default: the demo's `chroma-demo/config.jsonc`).
It is read when the code location loads, to give every asset a code version made of the
settings it reads: edit `learning_rate`, reload the code location, and Dagster shows
`lora_adapter` (only) as unsynced because its code version changed.
"""

from __future__ import annotations

import os
import warnings

from dagster import (
    AssetKey,
    AssetSelection,
    AssetSpec,
    AutomationCondition,
    AutomationConditionSensorDefinition,
    DefaultSensorStatus,
    Definitions,
    define_asset_job,
    in_process_executor,
    map_asset_specs,
)

from chroma_pipeline.config import ChromaConfig, ConfigError, load_config
from chroma_pipeline.steps import STEP_SETTINGS
from resources import ArtifactStore, ChromaConfigResource, GPUResource

from . import ALL_ASSETS

DEFAULT_CONFIG = "chroma-demo/config.jsonc"
# Bump when a step's code changes what it produces, so Dagster marks its results stale.
CODE_VERSION = "1"


def make_resources(config_path: str | None = None, device: str | None = None) -> dict:
    return {
        "chroma": ChromaConfigResource(config_path=config_path or os.environ.get("CHROMA_CONFIG", DEFAULT_CONFIG)),
        "gpu": GPUResource(device=device or os.environ.get("CHROMA_DEVICE", "auto")),
        "store": ArtifactStore(),
    }


def on_upstream_change() -> AutomationCondition:
    """Like `eager()`, but a parent counts as changed only when its data version changed.

    A forced re-materialization that produced the same data version requests nothing, and a
    settings change (a new code version) requests the asset itself. Parents requested on
    the same tick pull their children into the same run, so a caption edit becomes one run.
    """
    parent_changed = AutomationCondition.any_deps_match(
        (AutomationCondition.data_version_changed() & ~AutomationCondition.executed_with_root_target()).with_label(
            "data version changed"
        )
        | AutomationCondition.will_be_requested()
    )
    return (
        (AutomationCondition.newly_missing() | parent_changed | AutomationCondition.code_version_changed())
        .since_last_handled()
        & ~AutomationCondition.any_deps_missing()
        & ~AutomationCondition.any_deps_in_progress()
        & ~AutomationCondition.in_progress()
    ).with_label("on upstream data-version or settings change")


def _try_load(config_path: str) -> ChromaConfig | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return load_config(config_path)
    except ConfigError:
        return None  # the UI still loads; the run reports the problem before any work


def chain_assets(config: ChromaConfig | None) -> list:
    """The assets with code versions from `config` and the automation condition on every derived asset."""

    def configure(spec: AssetSpec) -> AssetSpec:
        step = spec.key.path[0]
        settings = config.settings_hash(*STEP_SETTINGS[step]) if config else "unconfigured"
        condition = None if step == "raw_dataset" else on_upstream_change()  # the scan is started by a person
        return spec.replace_attributes(code_version=f"{CODE_VERSION}+{settings}", automation_condition=condition)

    return map_asset_specs(configure, ALL_ASSETS)


def build_definitions(config_path: str | None = None, device: str | None = None) -> Definitions:
    resources = make_resources(config_path, device)
    config = _try_load(resources["chroma"].config_path)
    jobs = [
        define_asset_job("full_chain", AssetSelection.all(), description="dataset scan to validation grid"),
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
    ]
    automation = AutomationConditionSensorDefinition(
        "chroma_automation",
        target=AssetSelection.all(),
        default_status=DefaultSensorStatus.RUNNING,  # Dagster's own default sensor starts stopped
        minimum_interval_seconds=30,
        description="re-materializes what a dataset scan or a settings change made stale, and nothing else",
    )
    # One process for the whole run: the VAE, T5 and the transformer must not be loaded side
    # by side by parallel steps, and every step runs on the same accelerator anyway.
    return Definitions(
        assets=chain_assets(config), resources=resources, jobs=jobs, sensors=[automation],
        executor=in_process_executor,
    )


def materialize_chain(config_path: str, instance, selection=None, device: str | None = None, **kwargs):
    """Materialize (part of) the chain in-process, with the code versions the code location would give."""
    from dagster import materialize

    definitions = build_definitions(config_path, device)
    return materialize(
        list(definitions.assets), resources=definitions.resources, instance=instance, selection=selection, **kwargs
    )


defs = build_definitions()
