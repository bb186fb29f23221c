"""The Dagster code location: assets, resources and jobs in one `Definitions`.

The config file comes from $CHROMA_CONFIG (default: the demo's `chroma-demo/config.jsonc`);
the UI's launchpad can point a run at another file through the `chroma` resource.
"""

import os

from dagster import AssetSelection, Definitions, define_asset_job, in_process_executor

from resources import ArtifactStore, ChromaConfigResource, GPUResource

from . import ALL_ASSETS

DEFAULT_CONFIG = "chroma-demo/config.jsonc"


def make_resources(config_path: str | None = None, device: str | None = None) -> dict:
    return {
        "chroma": ChromaConfigResource(config_path=config_path or os.environ.get("CHROMA_CONFIG", DEFAULT_CONFIG)),
        "gpu": GPUResource(device=device or os.environ.get("CHROMA_DEVICE", "auto")),
        "store": ArtifactStore(),
    }


full_chain = define_asset_job("full_chain", selection=AssetSelection.all(), description="dataset to validation grid")

# One process for the whole run: the VAE, T5 and the transformer must not be loaded side by
# side by parallel steps, and every step runs on the same accelerator anyway.
defs = Definitions(assets=ALL_ASSETS, resources=make_resources(), jobs=[full_chain], executor=in_process_executor)
