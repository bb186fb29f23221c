from dagster import AssetExecutionContext, DataVersion, MaterializeResult, MetadataValue, asset

from chroma_pipeline.quantized_base import build_quantized
from resources import ArtifactStore, ChromaConfigResource, GPUResource

from ._versions import load_config_for

GIB = 2**30


@asset(group_name="chroma", kinds={"safetensors", "pytorch"})
def quantized_base_model(
    context: AssetExecutionContext, chroma: ChromaConfigResource, store: ArtifactStore, gpu: GPUResource
) -> MaterializeResult:
    """The Chroma transformer at `base_model_precision`, quantized once, block by block, and reloaded by later steps."""
    config = load_config_for(context, chroma, "quantized_base_model")
    result = build_quantized(config, store.layout(config), gpu.info(), log=context.log.info)
    stats = result.stats
    needs = stats["estimate"]
    metadata = {
        "precision": stats["precision"],
        "why this precision": stats["reason"],
        "reused": stats["reused"],
        "path": MetadataValue.path(str(result.path)),
        "estimated training memory GiB": round(needs.training_device / GIB, 2),
        "estimated host RAM to quantize GiB": round(needs.quantize_host_peak / GIB, 2),
    }
    if "bytes" in stats:
        metadata.update({
            "size on disk MiB": round(stats["bytes"] / 2**20, 2),
            "quantized parameters": stats["quantized_parameters"],
            "full-precision parameters": stats["kept_parameters"],
            "kept in full precision": ", ".join(stats["kept_full_precision"]),
            "quantize seconds": stats["seconds"],
        })
    if "peak_host_bytes" in stats:  # the process peak; older manifests recorded only the rise under this name
        rise = stats.get("host_rise_bytes")
        if rise is not None:
            metadata["process peak host RAM while quantizing GiB"] = round(stats["peak_host_bytes"] / GIB, 3)
            metadata["host RAM added by quantizing GiB"] = round(rise / GIB, 3)
        else:
            metadata["host RAM added by quantizing GiB"] = round(stats["peak_host_bytes"] / GIB, 3)
    return MaterializeResult(data_version=DataVersion(result.data_version), metadata=metadata)
