"""Dagster resources: everything the assets reach outside their own code.

Imported on first use: Dagster's daemon and webserver load `resources.run_launcher`, which must
not pay for torch and the project on the way.
"""

import importlib

_WHERE = {"ArtifactStore": ".artifacts", "ChromaConfigResource": ".chroma_config", "GPUResource": ".gpu"}

__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name], __name__), name)
