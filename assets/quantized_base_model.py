from dagster import AssetExecutionContext, DataVersion, MaterializeResult, MetadataValue, asset

from chroma_pipeline.steps import build_quantized
from resources import ArtifactStore, ChromaConfigResource, GPUResource

from ._versions import load_config_for


@asset(group_name="chroma", kinds={"safetensors", "pytorch"})
def quantized_base_model(
    context: AssetExecutionContext, chroma: ChromaConfigResource, store: ArtifactStore, gpu: GPUResource
) -> MaterializeResult:
    """The Chroma transformer at `base_model_precision`, quantized once and reloaded by later steps."""
    config = load_config_for(context, chroma, "quantized_base_model")
    result = build_quantized(config, store.layout(config), gpu.info(), log=context.log.info)
    stats = result.stats
    metadata = {
        "precision": stats["precision"],
        "reused": stats["reused"],
        "path": MetadataValue.path(str(result.path)),
    }
    if "bytes" in stats:
        metadata.update({
            "size MiB": round(stats["bytes"] / 2**20, 2),
            "quantized parameters": stats["quantized_parameters"],
            "full-precision parameters": stats["kept_parameters"],
            "kept in full precision": ", ".join(stats["kept_full_precision"]),
            "quantize seconds": stats["seconds"],
        })
    return MaterializeResult(data_version=DataVersion(result.data_version), metadata=metadata)
