from dagster import AssetExecutionContext, DataVersion, MaterializeResult, MetadataValue, asset

from chroma_pipeline.steps import build_embeddings
from resources import ArtifactStore, ChromaConfigResource, GPUResource

from .raw_dataset import raw_dataset


@asset(deps=[raw_dataset], group_name="chroma", kinds={"safetensors", "pytorch"})
def text_embeddings(
    context: AssetExecutionContext, chroma: ChromaConfigResource, store: ArtifactStore, gpu: GPUResource
) -> MaterializeResult:
    """Masked T5 embeddings of every caption, the empty caption and the validation prompts."""
    config = chroma.load(context.log)
    result = build_embeddings(config, store.layout(config), gpu.info(), log=context.log.info)
    return MaterializeResult(
        data_version=DataVersion(result.data_version),
        metadata={
            "distinct texts": result.stats["distinct_texts"],
            "encoded now": result.stats["encoded"],
            "reused from cache": result.stats["reused"],
            "max length": config.tokenizer_max_length,
            "padding": config.flux_t5_padding,
            "index": MetadataValue.path(str(result.path)),
        },
    )
