from collections import Counter

from dagster import AssetExecutionContext, DataVersion, MaterializeResult, MetadataValue, asset

from chroma_pipeline.steps import build_manifest
from resources import ArtifactStore, ChromaConfigResource

from ._metadata import markdown_table


@asset(group_name="chroma", kinds={"parquet"})
def raw_dataset(context: AssetExecutionContext, chroma: ChromaConfigResource, store: ArtifactStore) -> MaterializeResult:
    """Every image of `instance_data_dir` with its caption and content hashes, or the reason it was skipped."""
    config = chroma.load(context.log)
    result, rows = build_manifest(config, store.layout(config))
    skipped = [row for row in rows if row.status != "ok"]
    for row in skipped:
        context.log.warning(f"skipped {row.path}: {row.skip_reason}")
    reasons = Counter(row.skip_reason for row in skipped)
    return MaterializeResult(
        data_version=DataVersion(result.data_version),
        metadata={
            "samples": result.stats["samples"],
            "skipped": result.stats["skipped"],
            "skipped by reason": MetadataValue.json(dict(reasons)),
            "skipped files": markdown_table(["file", "reason"], [[r.path, r.skip_reason] for r in skipped[:200]]),
            "manifest": MetadataValue.path(str(result.path)),
            "dataset": MetadataValue.path(config.instance_data_dir),
        },
    )
