import warnings
from collections import Counter

from dagster import AssetExecutionContext, AssetKey, AssetSpec, DataVersion, MaterializeResult, MetadataValue, multi_asset

from chroma_pipeline.dataset import reason_group
from chroma_pipeline.fingerprint import fingerprint_config_datasets
from chroma_pipeline.raw_dataset import build_manifest
from resources import ArtifactStore, ChromaConfigResource

from ._metadata import markdown_table
from ._versions import load_config_for
from .dataset_folder import DATASET_FOLDER, latest_observed_version

# One scan, two assets: images and captions get separate data versions, so editing a
# caption leaves image_latents in sync and editing pixels leaves text_embeddings in sync.
IMAGES = AssetKey(["raw_dataset", "images"])
CAPTIONS = AssetKey(["raw_dataset", "captions"])
# The run log and the metadata name this many skipped files, however many there are (a 100k-image
# folder can skip thousands); the manifest lists every one with its reason.
SHOWN_SKIPPED = 200
SHOWN_DUPLICATES = 50


@multi_asset(
    name="raw_dataset",
    group_name="chroma",
    specs=[
        AssetSpec(IMAGES, deps=[DATASET_FOLDER], kinds={"parquet"},
                  description="The usable images of `instance_data_dir`, by content hash."),
        AssetSpec(CAPTIONS, deps=[DATASET_FOLDER], kinds={"parquet"}, description="Which caption goes with which image."),
    ],
)
def raw_dataset(context: AssetExecutionContext, chroma: ChromaConfigResource, store: ArtifactStore):
    """Scan the dataset folder into a manifest: every file, its content hashes, or why it was skipped."""
    config = load_config_for(context, chroma, "raw_dataset")
    layout = store.layout(config)
    # The jobs that scan observe `dataset_folder` first, so Dagster records that observation
    # as what this scan read. A scan on its own ("Materialize" on raw_dataset) reads the
    # folder as it is; if that differs from the last observation, its lineage names the old
    # one. Say so: `dataset_watch` records the change at its next tick, and the UI then
    # shows this scan as unsynced until it runs again with the observation.
    # Only the version is kept: the file list (two entries per image) need not stay in memory during the scan.
    fingerprint = fingerprint_config_datasets(config, layout.dataset_memo).version
    observed = latest_observed_version(context.instance)
    if fingerprint != observed:
        context.log.warning(
            ("The dataset folders " if config.named_datasets else "The dataset folder ")
            + ", ".join(str(d.root) for d in config.image_datasets) + " "
            + ("have" if config.named_datasets else "has")
            + (" no observation yet" if observed is None else " changed since its latest observation")
            + ": this scan reads it as it is now, but its lineage can only name what dataset_folder's latest "
            "observation says. dataset_watch records the folder at its next tick, and the UI then shows this "
            "scan as unsynced. Run the dataset_scan job (or select dataset_folder with the scan) to observe "
            "and scan in one run."
        )
    with warnings.catch_warnings(record=True) as caught:  # e.g. a caption that is not UTF-8
        warnings.simplefilter("always")
        result, rows = build_manifest(config, layout)
    for warning in caught:
        context.log.warning(str(warning.message))
    versions = result.stats["versions"]
    skipped = [row for row in rows if row.status != "ok"]
    for row in skipped[:SHOWN_SKIPPED]:
        context.log.warning(f"skipped {row.path}: {row.skip_reason}")
    if len(skipped) > SHOWN_SKIPPED:
        context.log.warning(f"... and {len(skipped) - SHOWN_SKIPPED:,} more skipped files, not logged one by one: "
                            f"{result.path} lists every file with its reason ('skipped by reason' counts them)")
    usable = [row for row in rows if row.status == "ok"]
    yield MaterializeResult(
        asset_key=IMAGES,
        data_version=DataVersion(versions.images),
        metadata={
            "samples": result.stats["samples"],
            "skipped": result.stats["skipped"],
            # "duplicate of a.png" and "duplicate of b.png" count as one reason; the table keeps which.
            "skipped by reason": MetadataValue.json(dict(Counter(reason_group(row.skip_reason) for row in skipped))),
            "skipped files": markdown_table(["file", "reason"], [[r.path, r.skip_reason] for r in skipped[:SHOWN_SKIPPED]],
                                            total=len(skipped), rest=f": {result.path} lists every one with its reason"),
            **_duplicates(rows),
            "manifest": MetadataValue.path(str(result.path)),
            "dataset": MetadataValue.path(config.data_backend_config or config.instance_data_dir),
            "dataset fingerprint": fingerprint,
            **(_per_dataset(config, rows) if config.named_datasets else {}),
        },
    )
    yield MaterializeResult(
        asset_key=CAPTIONS,
        data_version=DataVersion(versions.captions),
        metadata={
            "captions": len(usable),
            "distinct captions": len({row.caption_sha256 for row in usable}),
            "empty captions": sum(1 for row in usable if not row.caption),
            "captions by source": MetadataValue.json(dict(Counter(row.caption_source for row in usable))),
            "caption warnings": len(caught),
            "manifest": MetadataValue.path(str(result.path)),
        },
    )


def _duplicates(rows) -> dict:
    """Byte-identical copies: which file trains, with which caption, and which caption goes unused."""
    kept = {row.path: row for row in rows if row.status == "ok"}
    copies = [row for row in rows if row.duplicate_of]
    table = [[row.path, row.duplicate_of, kept[row.duplicate_of].caption[:80], row.caption[:80],
              "same caption" if row.caption == kept[row.duplicate_of].caption else "this file's caption is not used"]
             for row in copies[:SHOWN_DUPLICATES]]
    header = ["file (skipped)", "copy of (kept, first by name)", "kept caption", "its own caption", "captions"]
    rest = ": the manifest names each one's original (column duplicate_of)"
    return {"duplicates": len(copies),
            **({"duplicate files": markdown_table(header, table, total=len(copies), rest=rest)} if copies else {})}


def _per_dataset(config, rows) -> dict:
    """With a dataloader file: each dataset's folder, counts, skip reasons and bucket table."""
    summary, tables = [], {}
    for dataset in config.image_datasets:
        mine = [row for row in rows if row.dataset == dataset.id]
        ok = [row for row in mine if row.status == "ok"]
        reasons = Counter(reason_group(row.skip_reason) for row in mine if row.status != "ok")
        buckets = Counter("{}x{}".format(*dataset.bucket(r.width, r.height, config)) for r in ok)
        resolution = f"{dataset.setting('resolution', config):g} {dataset.setting('resolution_type', config)}"
        summary.append([dataset.id, str(dataset.root), resolution, len(ok), len(mine) - len(ok),
                        ", ".join(f"{n} {reason}" for reason, n in reasons.items()) or "-",
                        dataset.setting("repeats", config), f"{dataset.probability:g}"])
        tables[f"buckets: {dataset.id}"] = markdown_table(["bucket", "images"], sorted(buckets.items()))
    table = markdown_table(["dataset", "folder", "resolution", "samples", "skipped", "skipped by reason", "repeats",
                            "probability"], summary)
    return {"datasets": table, **tables}
