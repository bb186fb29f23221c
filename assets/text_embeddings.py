from dagster import AssetExecutionContext, DataVersion, MaterializeResult, MetadataValue, asset

from chroma_pipeline.text_embeddings import build_embeddings
from resources import ArtifactStore, ChromaConfigResource, GPUResource

from ._metadata import markdown_table
from ._versions import load_config_for
from .raw_dataset import CAPTIONS


@asset(deps=[CAPTIONS], group_name="chroma", kinds={"safetensors", "pytorch"})
def text_embeddings(
    context: AssetExecutionContext, chroma: ChromaConfigResource, store: ArtifactStore, gpu: GPUResource
) -> MaterializeResult:
    """Masked T5 embeddings of every caption, the empty caption and the validation prompts."""
    config = load_config_for(context, chroma, "text_embeddings")
    result = build_embeddings(config, store.layout(config), gpu.info(), log=context.log.info, warn=context.log.warning)
    over_long = result.stats["over_long"]
    return MaterializeResult(
        data_version=DataVersion(result.data_version),
        metadata={
            "distinct texts": result.stats["distinct_texts"],
            "encoded now": result.stats["encoded"],
            "reused from cache": result.stats["reused"],
            "dropped from index": result.stats["dropped"],
            "MiB on disk": round(result.stats["bytes_on_disk"] / 2**20, 3),
            "MiB saved by storing only unmasked tokens": round(
                (result.stats["bytes_unpruned"] - result.stats["bytes_on_disk"]) / 2**20, 3
            ),
            "max length": config.tokenizer_max_length,
            "padding": config.flux_t5_padding,
            "text encoder precision": config.text_encoder_precision,
            "index": MetadataValue.path(str(result.path)),
            # Cut texts train on their first tokenizer_max_length tokens only; the check
            # captions_fit_tokenizer_max_length shows them as a warning too.
            "texts over tokenizer_max_length": len(over_long),
            **({"over-long texts": markdown_table(
                ["caption (image file) or prompt", "tokens"], [list(item) for item in over_long[:50]], total=len(over_long),
                rest=f": {result.path} holds every text's token count (column tokens)")} if over_long else {}),
            **({"datasets": markdown_table(["dataset", "images (one caption each)", "encoded now"],
                                           [[d, c["captions"], c["encoded"]] for d, c in result.stats["datasets"].items()])}
               if "datasets" in result.stats else {}),
        },
    )
