from dagster import AssetExecutionContext, DataVersion, MaterializeResult, MetadataValue, asset

from chroma_pipeline.validation_grid import build_grid
from resources import ArtifactStore, ChromaConfigResource, GPUResource

from ._metadata import image_markdown
from ._versions import load_config_for
from .lora_adapter import lora_adapter
from .quantized_base_model import quantized_base_model
from .text_embeddings import text_embeddings


@asset(deps=[lora_adapter, quantized_base_model, text_embeddings], group_name="chroma", kinds={"png"})
def validation_grid(
    context: AssetExecutionContext, chroma: ChromaConfigResource, store: ArtifactStore, gpu: GPUResource
) -> MaterializeResult:
    """Validation prompts x seeds, base model beside the LoRA, rendered with diffusers' ChromaPipeline."""
    config = load_config_for(context, chroma, "validation_grid")
    result = build_grid(config, store.layout(config), gpu.info(), log=context.log.info)
    for cell in result.stats["blank_cells"]:
        context.log.warning(f"unusable validation image: {cell}")
    progress = result.path.parent / "progress.png"
    return MaterializeResult(
        data_version=DataVersion(result.data_version),
        metadata={
            "grid": image_markdown(result.path, "validation grid"),
            **({"progress during training": image_markdown(progress, "progress")} if progress.is_file() else {}),
            "grid path": MetadataValue.path(str(result.path)),
            "images": result.stats["cells"],
            "re-rendered": not result.stats["reused"],
            "blank images": len(result.stats["blank_cells"]),
            "guidance_scale": config.validation_guidance_real,
            "steps": config.validation_num_inference_steps,
        },
    )
