"""Asset checks, shown under each asset in the UI.

The checks on data and on the base model are blocking: when one fails, the run stops
before `lora_adapter`, and the automation sensor does not start training on top of
it until the check passes again. The UI shows the failed check, its description
(what is wrong and what to do) and the offending files. The one exception warns:
captions cut to `tokenizer_max_length` still train (on their first tokens), so that
check fails with WARN severity and blocks nothing.
"""

from pathlib import Path

from dagster import AssetCheckExecutionContext, AssetCheckResult, AssetCheckSeverity, AssetKey, MetadataValue, asset_check

from chroma_pipeline import checks
from chroma_pipeline.checks import CheckOutcome
from resources import ArtifactStore, ChromaConfigResource, GPUResource

from .image_latents import image_latents
from .lora_adapter import lora_adapter
from .quantized_base_model import quantized_base_model
from .text_embeddings import text_embeddings
from .validation_grid import validation_grid


def _result(outcome: CheckOutcome, severity=AssetCheckSeverity.ERROR) -> AssetCheckResult:
    metadata = dict(outcome.counts)
    if outcome.problems:
        metadata["problems"] = MetadataValue.md("\n".join(f"- {problem}" for problem in outcome.problems))
    return AssetCheckResult(passed=outcome.passed, description=outcome.description, metadata=metadata, severity=severity)


def _latest_path(context: AssetCheckExecutionContext, key: str, label: str) -> Path | None:
    """The artifact the asset's latest materialization wrote, if it recorded one that still exists."""
    event = context.instance.get_latest_materialization_event(AssetKey(key))
    entry = event.asset_materialization.metadata.get(label) if event and event.asset_materialization else None
    path = Path(entry.value) if entry is not None else None
    return path if path is not None and path.exists() else None


def _nothing_to_check(key: str) -> AssetCheckResult:
    return AssetCheckResult(passed=False, description=f"no {key} artifact on disk to check: materialize {key} first")


@asset_check(asset=image_latents, blocking=True, description="every usable image has a finite latent of its bucket's shape")
def latents_complete_and_finite(context: AssetCheckExecutionContext, chroma: ChromaConfigResource, store: ArtifactStore):
    config = chroma.load()  # the asset that ran before logged its notes
    return _result(checks.latents_complete_and_finite(config, store.layout(config)))


@asset_check(asset=text_embeddings, blocking=True,
             description="every embedding keeps its text's tokens plus exactly one padding token open, finite values")
def masks_keep_one_padding_token(context: AssetCheckExecutionContext, chroma: ChromaConfigResource, store: ArtifactStore):
    config = chroma.load()  # the asset that ran before logged its notes
    return _result(checks.embeddings_follow_mask_rule(config, store.layout(config)))


@asset_check(asset=text_embeddings, blocking=False,
             description="no caption or prompt is longer than tokenizer_max_length tokens (a longer one is cut); "
             "a warning, training goes on")
def captions_fit_tokenizer_max_length(context: AssetCheckExecutionContext, chroma: ChromaConfigResource,
                                      store: ArtifactStore):
    config = chroma.load()  # the asset that ran before logged its notes
    return _result(checks.captions_fit_tokenizer_max_length(config, store.layout(config)), AssetCheckSeverity.WARN)


@asset_check(asset=quantized_base_model, blocking=True, description="the reloaded base model's forward pass is finite")
def forward_pass_is_finite(
    context: AssetCheckExecutionContext, chroma: ChromaConfigResource, store: ArtifactStore, gpu: GPUResource
):
    config = chroma.load()  # the asset that ran before logged its notes
    return _result(checks.quantized_forward_is_finite(config, store.layout(config), gpu.info()))


@asset_check(asset=lora_adapter, blocking=True,
             description="the adapter loads with diffusers' LoRA loader, every module applies, and the output changes")
def adapter_changes_output(
    context: AssetCheckExecutionContext, chroma: ChromaConfigResource, store: ArtifactStore, gpu: GPUResource
):
    config = chroma.load()  # the asset that ran before logged its notes
    adapter = _latest_path(context, "lora_adapter", "adapter")
    if adapter is None:
        return _nothing_to_check("lora_adapter")
    return _result(checks.adapter_changes_output(config, store.layout(config), gpu.info(), adapter))


@asset_check(asset=validation_grid, description="no validation image is flat, black or NaN")
def grid_not_blank(context: AssetCheckExecutionContext):
    grid = _latest_path(context, "validation_grid", "grid path")
    if grid is None or not (grid.parent / "grid.json").is_file():
        return _nothing_to_check("validation_grid")
    return _result(checks.grid_not_blank(grid.parent))


ALL_CHECKS = [
    latents_complete_and_finite, masks_keep_one_padding_token, captions_fit_tokenizer_max_length,
    forward_pass_is_finite, adapter_changes_output, grid_not_blank,
]
