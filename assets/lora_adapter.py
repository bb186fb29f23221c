import os

from dagster import AssetExecutionContext, DataVersion, MaterializeResult, MetadataValue, PipesSubprocessClient, asset

from chroma_pipeline.steps import build_adapter, existing_adapter
from chroma_pipeline.train import launch_command
from resources import ArtifactStore, ChromaConfigResource, GPUResource

from ._metadata import image_markdown, loss_curve
from ._versions import load_config_for
from .image_latents import image_latents
from .quantized_base_model import quantized_base_model
from .text_embeddings import text_embeddings


@asset(deps=[image_latents, text_embeddings, quantized_base_model], group_name="chroma", kinds={"safetensors", "pytorch"})
def lora_adapter(
    context: AssetExecutionContext, chroma: ChromaConfigResource, store: ArtifactStore, gpu: GPUResource,
    pipes: PipesSubprocessClient,
) -> MaterializeResult:
    """A LoRA trained on the cached latents and embeddings, in diffusers format (`pytorch_lora_weights.safetensors`).

    With `num_processes` > 1 the training runs in `accelerate launch` workers (DDP) through
    Dagster Pipes: rank 0's log streams into this run, cancelling the run stops the workers
    after a checkpoint, and the adapter they write is then picked up here.
    """
    config = load_config_for(context, chroma, "lora_adapter")
    device = gpu.info()
    context.log.info(f"training on {device.kind} ({device.name}) in {device.compute_dtype(config.mixed_precision)}")
    launched = config.num_processes > 1 and existing_adapter(config, store.layout(config), device) is None
    if launched:
        command = launch_command(chroma.config_path, config.num_processes, gpu.device)
        context.log.info(f"launching {config.num_processes} training processes: {' '.join(command)}")
        pipes.run(command=command, context=context, env={"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0")})
    result = build_adapter(config, store.layout(config), device, log=context.log.info)
    losses = result.stats["losses"]
    tail = losses[-max(1, len(losses) // 10):]
    metadata = {
        "steps": result.stats["steps"],
        "final loss": float(losses[-1]),
        "smoothed final loss": float(sum(tail) / len(tail)),
        "retrained": launched or not result.stats["reused"],
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
    # From this run's training, or from training.json when the adapter was trained before (or by workers).
    for label, key in (("trainable parameters", "trainable_parameters"), ("wall seconds", "seconds"),
                       ("resumed from step", "resumed_from")):
        if key in result.stats:
            metadata[label] = round(result.stats[key] or 0, 1) if key == "seconds" else result.stats[key] or 0
    if not result.stats["reused"]:
        metadata["peak memory GiB"] = round(result.stats["peak_memory_bytes"] / 2**30, 3)
    if "processes" in result.stats:
        metadata["training processes"] = result.stats["processes"]
        metadata["samples per rank"] = MetadataValue.json(result.stats["samples_per_rank"])
    return MaterializeResult(data_version=DataVersion(result.data_version), metadata=metadata)
