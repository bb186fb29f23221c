"""Code versions: which settings each asset reads, as Dagster sees them."""

from __future__ import annotations

from dagster import AssetExecutionContext, Failure

from chroma_pipeline import image_latents, lora_adapter, quantized_base, raw_dataset, text_embeddings, validation_grid
from chroma_pipeline.config import ChromaConfig
from resources import ChromaConfigResource

# Bump when a step's code changes what it produces, so Dagster marks its results stale.
CODE_VERSION = "1"

# The settings each step reads. A change to one of them changes that step's code version
# in Dagster (and only that step's), which is how the UI shows a setting made it stale.
STEP_SETTINGS = {
    "raw_dataset": raw_dataset.SETTINGS,
    "image_latents": image_latents.SETTINGS,
    "text_embeddings": text_embeddings.SETTINGS,
    "quantized_base_model": quantized_base.SETTINGS,
    "lora_adapter": lora_adapter.SETTINGS,
    "validation_grid": validation_grid.SETTINGS,
}


ALL_STEP_SETTINGS = tuple(sorted({name for names in STEP_SETTINGS.values() for name in names}))


def steps_reading(settings) -> list[str]:
    """The steps whose code version one of these settings is part of."""
    return [step for step, names in STEP_SETTINGS.items() if set(names) & set(settings)]


def step_code_version(config: ChromaConfig, step: str) -> str:
    return f"{CODE_VERSION}+{config.settings_hash(*STEP_SETTINGS[step])}"


def load_config_for(context: AssetExecutionContext, chroma: ChromaConfigResource, step: str) -> ChromaConfig:
    """The run's config, refusing one whose settings differ from the code version Dagster will record.

    That happens when the launchpad points a run at another config file, or the file was
    edited and the code location not reloaded: the run would record the wrong settings and
    Dagster's "unsynced" would stop telling the truth.
    """
    config = chroma.load()  # its notes went to the run's log when the resource was set up
    defined = next(iter(context.assets_def.code_versions_by_key.values()))
    if defined is not None and defined != step_code_version(config, step):
        raise Failure(
            description=(
                f"{chroma.config_path} has settings that differ from the ones this code location loaded "
                f"(settings read by {step}: {', '.join(STEP_SETTINGS[step])}). Reload the code location "
                "(Deployment > Reload, or restart dagster dev) so Dagster tracks the settings you run with."
            )
        )
    return config
