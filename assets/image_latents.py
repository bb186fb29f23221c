from dagster import AssetExecutionContext, DataVersion, MaterializeResult, MetadataValue, asset

from chroma_pipeline.image_latents import build_latents
from chroma_pipeline.report import bucket_histogram
from resources import ArtifactStore, ChromaConfigResource, GPUResource

from ._metadata import image_markdown, markdown_table
from ._versions import load_config_for
from .raw_dataset import IMAGES


@asset(deps=[IMAGES], group_name="chroma", kinds={"safetensors", "pytorch"})
def image_latents(
    context: AssetExecutionContext, chroma: ChromaConfigResource, store: ArtifactStore, gpu: GPUResource
) -> MaterializeResult:
    """VAE latents of every usable image in its aspect bucket; only new or changed images are encoded."""
    config = load_config_for(context, chroma, "image_latents")
    result = build_latents(config, store.layout(config), gpu.info(), log=context.log.info)
    buckets = result.stats["buckets"]
    return MaterializeResult(
        data_version=DataVersion(result.data_version),
        metadata={
            "samples": result.stats["samples"],
            "encoded now": result.stats["encoded"],
            "reused from cache": result.stats["reused"],
            "buckets": markdown_table(["bucket (w x h)", "images"], [[b, n] for b, n in buckets.items()]),
            "bucket histogram": image_markdown(bucket_histogram(buckets), "images per bucket"),
            "index": MetadataValue.path(str(result.path)),
            **({"datasets": markdown_table(
                ["dataset", "samples", "encoded now", "buckets"],
                [[d, c["samples"], c["encoded"], ", ".join(f"{b}: {n}" for b, n in c["buckets"].items())]
                 for d, c in result.stats["datasets"].items()])} if "datasets" in result.stats else {}),
        },
    )
