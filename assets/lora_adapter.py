from dagster import AssetExecutionContext, DataVersion, MaterializeResult, MetadataValue, asset

from chroma_pipeline.steps import build_adapter
from resources import ArtifactStore, ChromaConfigResource, GPUResource

from ._metadata import image_markdown, loss_curve
from ._versions import load_config_for
from .image_latents import image_latents
from .quantized_base_model import quantized_base_model
from .text_embeddings import text_embeddings


@asset(deps=[image_latents, text_embeddings, quantized_base_model], group_name="chroma", kinds={"safetensors", "pytorch"})
def lora_adapter(
    context: AssetExecutionContext, chroma: ChromaConfigResource, store: ArtifactStore, gpu: GPUResource
) -> MaterializeResult:
    """A LoRA trained on the cached latents and embeddings, in diffusers format (`pytorch_lora_weights.safetensors`)."""
    config = load_config_for(context, chroma, "lora_adapter")
    device = gpu.info()
    context.log.info(f"training on {device.kind} ({device.name}) in {device.compute_dtype(config.mixed_precision)}")
    result = build_adapter(config, store.layout(config), device, log=context.log.info)
    losses = result.stats["losses"]
    tail = losses[-max(1, len(losses) // 10):]
    metadata = {
        "steps": result.stats["steps"],
        "final loss": float(losses[-1]),
        "smoothed final loss": float(sum(tail) / len(tail)),
        "retrained": not result.stats["reused"],
        "loss curve": image_markdown(loss_curve(losses, result.stats.get("validation_losses")), "loss curve"),
        "adapter": MetadataValue.path(str(result.path)),
        **{f"gpu: {name}": value for name, value in gpu.describe().items()},
    }
    validation = result.stats.get("validation_losses") or []
    if validation:
        metadata["validation loss"] = float(validation[-1][1])  # plotted across materializations by the UI
        metadata["validation loss at step"] = int(validation[-1][0])
    strips = sorted(result.path.parent.glob("progress/step_*.png"))
    if strips:
        from PIL import Image

        from chroma_pipeline.grid import stack

        metadata["progress"] = image_markdown(stack([Image.open(p).convert("RGB") for p in strips]), "progress")
    if not result.stats["reused"]:
        metadata.update({
            "trainable parameters": result.stats["trainable_parameters"],
            "wall seconds": round(result.stats["seconds"], 1),
            "peak memory GiB": round(result.stats["peak_memory_bytes"] / 2**30, 3),
            "resumed from step": result.stats["resumed_from"] or 0,
        })
    return MaterializeResult(data_version=DataVersion(result.data_version), metadata=metadata)
