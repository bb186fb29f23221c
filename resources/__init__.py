"""Dagster resources: everything the assets reach outside their own code."""

from .artifacts import ArtifactStore
from .chroma_config import ChromaConfigResource
from .gpu import GPUResource

__all__ = ["ArtifactStore", "ChromaConfigResource", "GPUResource"]
