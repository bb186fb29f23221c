"""Many small tensors in a few large safetensors files, found through a Parquet map.

A dataset of 100k images must not mean 100k files. Entries written in one run go into
shards of at most a few hundred MB; `shards.parquet` maps each entry's key to its shard.

Entries become durable in chunks as they are made: a shard is committed once it holds
MAX_SHARD_BYTES or its first entry is CHUNK_SECONDS old, so a run killed at any moment
loses at most one chunk of encoding. A shard is written under a temporary name and
renamed, and the map is rewritten after it, both under the store's lock: a crash leaves
at worst an unmapped shard or temporary file (removed by `compact`), never a map entry
pointing at half a file. A shard that does not open, or lacks an entry, is treated as absent.
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

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}

MAX_SHARD_BYTES = 256 * 2**20
# An hour of VAE time on a large dataset must not hang on one final write: commit at least
# this often. Each commit rewrites the map (a few MB at 100k entries), so not much more often.
CHUNK_SECONDS = 30.0


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
    def __init__(self, folder: Path, max_shard_bytes: int = MAX_SHARD_BYTES, chunk_seconds: float | None = None):
        self.folder = Path(folder)
        self.map_path = self.folder / "shards.parquet"
        self.max_shard_bytes = max_shard_bytes
        self.chunk_seconds = CHUNK_SECONDS if chunk_seconds is None else chunk_seconds
        self._pending_since = 0.0
        self.mapping: dict[str, str] = self._read_map()  # entry key -> shard file name
        self._open: dict[str, object] = {}
        self._broken: set[str] = set()
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_keys: list[str] = []
        self._pending_bytes = 0

    def _read(self, key: str, read):
        """`read(handle)` on the open shard holding `key`; None if absent. A shard that fails once (missing,
        truncated or foreign: safetensors refuses a file shorter than its header says) is not tried again."""
        shard = self.mapping.get(key)
        if shard is None or shard in self._broken:
            return None
        try:
            handle = self._open.get(shard) or self._open.setdefault(
                shard, safe_open(str(self.folder / shard), framework="pt")
            )
            return read(handle)
        except Exception:  # recompute rather than trust it
            self._broken.add(shard)
            return None

    def get(self, key: str, names: tuple[str, ...]) -> dict[str, torch.Tensor] | None:
        return self._read(key, lambda handle: {name: handle.get_tensor(f"{key}/{name}") for name in names})

    def shapes(self, key: str, names: tuple[str, ...]) -> dict[str, tuple[tuple[int, ...], str]] | None:
        """Each tensor's (shape, dtype) as the shard's header gives them, reading no tensor data; None if absent."""
        def header(handle):
            slices = {name: handle.get_slice(f"{key}/{name}") for name in names}
            return {name: (tuple(piece.get_shape()), piece.get_dtype()) for name, piece in slices.items()}

        return self._read(key, header)

    def put(self, key: str, tensors: dict[str, torch.Tensor], flush_when_full: bool = True) -> None:
        if not self._pending_keys:
            self._pending_since = time.monotonic()
        for name, tensor in tensors.items():
            tensor = tensor.detach().contiguous().cpu()
            self._pending[f"{key}/{name}"] = tensor
            self._pending_bytes += tensor.numel() * tensor.element_size()
        self._pending_keys.append(key)
        chunk_is_old = time.monotonic() - self._pending_since >= self.chunk_seconds
        if flush_when_full and (self._pending_bytes >= self.max_shard_bytes or chunk_is_old):
            self.flush()

    @property
    def pending(self) -> int:
        """Entries put but not yet committed (lost if the process dies now)."""
        return len(self._pending_keys)

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

    def compact(self, live_keys: set[str], names: tuple[str, ...], dry_run: bool = False,
                keep_newer_than: float | None = None) -> tuple[int, int]:
        """Drop entries not in `live_keys`: delete dead shards, rewrite partly dead ones, remove leftovers.

        Shards written after `keep_newer_than` (a timestamp) are kept whole: they belong to a
        run that has not written its index yet, perhaps one that was killed and will resume.
        Returns (files removed, bytes freed); with `dry_run`, what a real run would remove and
        free (the bytes to within a shard header), touching nothing.
        """
        with _locked(self.folder):
            return self._compact(live_keys, names, dry_run, keep_newer_than)

    def _compact(self, live_keys: set[str], names: tuple[str, ...], dry_run: bool,
                 keep_newer_than: float | None) -> tuple[int, int]:
        self._open.clear()
        self.mapping = self._read_map()
        by_shard: dict[str, list[str]] = {}
        for key, shard in self.mapping.items():
            by_shard.setdefault(shard, []).append(key)
        if keep_newer_than is not None:
            young = [s for s in by_shard if (self.folder / s).is_file() and (self.folder / s).stat().st_mtime > keep_newer_than]
            live_keys = set(live_keys).union(*(by_shard[s] for s in young))
        rewritten = {shard: keys for shard, keys in by_shard.items() if any(k not in live_keys for k in keys)}
        # Every write into this folder happens under the lock we hold, so an unmapped shard or
        # a temporary file here is a crashed writer's leftover, however young.
        leftovers = [p for p in self.folder.glob("*.safetensors") if p.name not in by_shard]
        leftovers += list(self.folder.glob(".*.tmp"))
        removed = [self.folder / shard for shard in rewritten] + leftovers
        if dry_run:
            copied = sum(self._entry_bytes(shard, [k for k in keys if k in live_keys], names)
                         for shard, keys in rewritten.items())
            return len(removed), sum(p.stat().st_size for p in removed) - copied
        before = self._bytes_on_disk() + sum(p.stat().st_size for p in self.folder.glob(".*.tmp"))
        for keys in rewritten.values():
            for key in keys:
                entry = self.get(key, names) if key in live_keys else None
                if entry is not None:  # copied into a new shard; the map points there after the write below
                    self.put(key, entry, flush_when_full=False)
                self.mapping.pop(key)
        if self._pending:  # flush() without taking the lock again: we hold it
            shard = f"{uuid.uuid4().hex}.safetensors"
            save_tensors_atomic(self.folder / shard, self._pending)
            self.mapping.update({key: shard for key in self._pending_keys})
            self._pending, self._pending_keys, self._pending_bytes = {}, [], 0
        self._write_map()
        # Only now, with the new map on disk, is it safe to delete what it no longer names.
        self._open.clear()
        for path in removed:
            path.unlink(missing_ok=True)
        return len(removed), before - self._bytes_on_disk()

    def _entry_bytes(self, shard: str, keys: list[str], names: tuple[str, ...]) -> int:
        """Bytes these entries will take in a new shard: their tensors, and their share of a header."""
        if not keys:
            return 0
        path = self.folder / shard
        try:
            with safe_open(str(path), framework="pt") as handle:
                total = 0
                for key in keys:
                    for name in names:
                        piece = handle.get_slice(f"{key}/{name}")
                        count = 1
                        for size in piece.get_shape():
                            count *= size
                        total += count * torch.empty((), dtype=_DTYPES[piece.get_dtype()]).element_size()
                tensors_in_shard = len(list(handle.keys()))
            with open(path, "rb") as raw:  # safetensors starts with its header's length, 8 bytes little-endian
                header = 8 + int.from_bytes(raw.read(8), "little")
            return total + header * len(keys) * len(names) // tensors_in_shard
        except Exception:  # a broken shard: nothing in it would be copied
            return 0

    def _bytes_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.folder.glob("*.safetensors")) if self.folder.is_dir() else 0
