"""Many small tensors in a few large safetensors files, found through a Parquet map.

A dataset of 100k images must not mean 100k files. Entries written in one run go into
shards of a few hundred MB; `shards.parquet` maps each entry's key to its shard. A shard
is written under a temporary name and renamed, and the map is rewritten after it, so a
crash leaves at worst an orphan shard (removed by `compact`), never a map entry pointing
at half a file. A shard that does not open, or lacks an entry, is treated as absent.
"""

from __future__ import annotations

import fcntl
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import safe_open

from .storage import atomic_path, save_tensors_atomic

MAX_SHARD_BYTES = 256 * 2**20
ORPHAN_AGE_SECONDS = 3600  # younger unmapped files may belong to a run still writing


@contextmanager
def _locked(folder: Path):
    """One writer at a time per store: a latents run, a second one, or cleanup."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class ShardStore:
    def __init__(self, folder: Path, max_shard_bytes: int = MAX_SHARD_BYTES):
        self.folder = Path(folder)
        self.map_path = self.folder / "shards.parquet"
        self.max_shard_bytes = max_shard_bytes
        self.mapping: dict[str, str] = self._read_map()  # entry key -> shard file name
        self._open: dict[str, object] = {}
        self._broken: set[str] = set()
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_keys: list[str] = []
        self._pending_bytes = 0

    def get(self, key: str, names: tuple[str, ...]) -> dict[str, torch.Tensor] | None:
        shard = self.mapping.get(key)
        if shard is None or shard in self._broken:
            return None
        try:
            handle = self._open.get(shard) or self._open.setdefault(
                shard, safe_open(str(self.folder / shard), framework="pt")
            )
            return {name: handle.get_tensor(f"{key}/{name}") for name in names}
        except Exception:  # missing, truncated or foreign file: recompute rather than trust it
            self._broken.add(shard)
            return None

    def put(self, key: str, tensors: dict[str, torch.Tensor], flush_when_full: bool = True) -> None:
        for name, tensor in tensors.items():
            tensor = tensor.detach().contiguous().cpu()
            self._pending[f"{key}/{name}"] = tensor
            self._pending_bytes += tensor.numel() * tensor.element_size()
        self._pending_keys.append(key)
        if flush_when_full and self._pending_bytes >= self.max_shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        shard = f"{uuid.uuid4().hex}.safetensors"
        with _locked(self.folder):
            save_tensors_atomic(self.folder / shard, self._pending)
            # Merge with what other writers mapped since we opened the store, never overwrite it.
            self.mapping = {**self._read_map(), **{key: shard for key in self._pending_keys}}
            self._write_map()
        self._pending, self._pending_keys, self._pending_bytes = {}, [], 0

    def _read_map(self) -> dict[str, str]:
        if not self.map_path.is_file():
            return {}
        table = pq.read_table(self.map_path).to_pydict()
        return dict(zip(table["key"], table["shard"], strict=True))

    def _write_map(self) -> None:
        keys = sorted(self.mapping)
        table = pa.table({"key": keys, "shard": [self.mapping[k] for k in keys]})
        with atomic_path(self.map_path) as tmp:
            pq.write_table(table, tmp)

    def compact(self, live_keys: set[str], names: tuple[str, ...]) -> tuple[int, int]:
        """Drop entries not in `live_keys`: delete dead shards, rewrite partly dead ones.

        Returns (files removed, bytes freed).
        """
        with _locked(self.folder):
            return self._compact(live_keys, names)

    def _compact(self, live_keys: set[str], names: tuple[str, ...]) -> tuple[int, int]:
        self._open.clear()
        self.mapping = self._read_map()
        by_shard: dict[str, list[str]] = {}
        for key, shard in self.mapping.items():
            by_shard.setdefault(shard, []).append(key)
        before, emptied = self._bytes_on_disk(), []
        for shard, keys in by_shard.items():
            live = [k for k in keys if k in live_keys]
            if len(live) == len(keys):
                continue
            for key in live:  # copied into a new shard; the map points there after flush()
                entry = self.get(key, names)
                if entry is not None:
                    self.put(key, entry, flush_when_full=False)
                else:
                    self.mapping.pop(key)
            for key in keys:
                if key not in live_keys:
                    self.mapping.pop(key)
            emptied.append(shard)
        if self._pending:  # flush() without taking the lock again: we hold it
            shard = f"{uuid.uuid4().hex}.safetensors"
            save_tensors_atomic(self.folder / shard, self._pending)
            self.mapping.update({key: shard for key in self._pending_keys})
            self._pending, self._pending_keys, self._pending_bytes = {}, [], 0
        self._write_map()
        # Only now, with the new map on disk, is it safe to delete what it no longer names.
        self._open.clear()
        known = set(self.mapping.values())
        old_enough = time.time() - ORPHAN_AGE_SECONDS
        orphans = [
            p for p in self.folder.glob("*.safetensors") if p.name not in known and p.stat().st_mtime < old_enough
        ]
        stale = [self.folder / s for s in emptied] + orphans
        for path in set(stale):
            path.unlink(missing_ok=True)
        return len(set(stale)), before - self._bytes_on_disk()

    def _bytes_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.folder.glob("*.safetensors")) if self.folder.is_dir() else 0
