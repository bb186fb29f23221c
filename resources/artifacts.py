from pathlib import Path

from dagster import ConfigurableResource

from chroma_pipeline.config import ChromaConfig
from chroma_pipeline.layout import Layout


class ArtifactStore(ConfigurableResource):
    """Where artifacts are written: the config's `output_dir`, unless `root` overrides it.

    Assets write files here and hand Dagster only paths and data versions, so no tensor
    ever goes through a pickling IO manager.
    """

    root: str = ""

    def layout(self, config: ChromaConfig) -> Layout:
        return Layout(Path(self.root or config.output_dir).resolve())
