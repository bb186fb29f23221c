"""Atomic file writes and content hashing: a cache entry is either complete or absent."""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

_UMASK = os.umask(0)
os.umask(_UMASK)

_HOST = socket.gethostname().replace(".", "-")
ORPHAN_AGE_SECONDS = 3600  # a temporary file this old is abandoned even if its writer cannot be checked


@contextmanager
def atomic_path(target: Path):
    """Yield a temporary path beside `target`; rename it onto `target` only if the block succeeds.

    The temporary name carries the writer's host and pid, so cleanup can tell a write in
    progress from one a killed process left behind (`left_by_dead_writer`).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{_HOST}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the user's usual permissions
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(target: Path):
    """Yield an empty staging folder beside `target`; it replaces `target` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield staging
        os.chmod(staging, 0o777 & ~_UMASK)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def left_by_dead_writer(temporary: Path) -> bool:
    """Whether an `atomic_path` temporary file is abandoned: its writer died on this host, or it is old.

    A writer on another host (a shared volume) cannot be checked, so only age decides there.
    """
    temporary = Path(temporary)
    try:
        age = time.time() - temporary.stat().st_mtime
    except FileNotFoundError:
        return False
    if age > ORPHAN_AGE_SECONDS:
        return True
    parts = temporary.name.rsplit(".", 4)  # .<name>.<host>.<pid>.<random>.tmp
    if len(parts) != 5 or parts[1] != _HOST or not parts[2].isdigit():
        return False
    try:
        os.kill(int(parts[2]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def write_bytes_atomic(target: Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(target: Path, value) -> None:
    write_bytes_atomic(target, json.dumps(value, indent=2, sort_keys=True, default=str).encode())


def save_tensors_atomic(target: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    with atomic_path(target) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_tensors_checked(path: Path, expected: Callable[[dict[str, torch.Tensor]], bool] | None = None):
    """Load a safetensors file, or return None when it is missing, truncated or fails `expected`."""
    if not Path(path).is_file():
        return None
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError):
        return None
    if expected is not None and not expected(tensors):
        return None
    return tensors


# Rows go through Arrow this many at a time: at 100k rows, converting them all at once held the
# rows three times over (dataclasses, dicts, Arrow table; benchmarks/scale.py).
ROWS_PER_BATCH = 8192


def write_rows_atomic(rows: list, schema: pa.Schema, path: Path) -> None:
    """Write dataclass rows as one Parquet table, atomically, converting a batch of rows at a time."""
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for start in range(0, len(rows), ROWS_PER_BATCH):
            batch = rows[start : start + ROWS_PER_BATCH]
            # Column by column: a dict per row (dataclasses.asdict) took a tenth of a no-op re-run.
            columns = [[getattr(row, name) for row in batch] for name in schema.names]
            writer.write_batch(pa.record_batch(columns, schema=schema))


def _must_exist(path: Path, made_by: str) -> None:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} does not exist yet: materialize {made_by} first")


def read_rows(path: Path, row_type, made_by: str) -> list:
    """Read a Parquet table written by `write_rows_atomic` back into `row_type` rows, a batch at a time."""
    _must_exist(path, made_by)
    # One thread: Arrow's per-thread memory pools kept ~20 MiB more at 100k rows, and were no faster.
    with pq.ParquetFile(path) as table:
        return [row_type(**row) for batch in table.iter_batches(ROWS_PER_BATCH, use_threads=False)
                for row in batch.to_pylist()]


def read_columns(path: Path, columns: list[str], made_by: str) -> dict[str, list]:
    """Some columns of a table written by `write_rows_atomic`, as lists: what a reader needs, not whole rows."""
    _must_exist(path, made_by)
    return pq.read_table(path, columns=columns, use_threads=False).to_pydict()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def user_cache_file(name: str) -> Path:
    """A file of this user's chroma-pipeline cache (XDG_CACHE_HOME, else ~/.cache), shared by every project."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "chroma-pipeline" / name


def combine_hashes(*parts: str) -> str:
    """One short hash naming a set of inputs; order matters, so callers pass sorted lists."""
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def parse_jsonc(text: str):
    """JSON with comments and trailing commas (see `_parse_jsonc`); parsed once per distinct text.

    A run reads its config in several places, and json5's parser is pure Python (60 ms for the
    demo's config): each caller gets its own copy of the one parse.
    """
    return copy.deepcopy(_parse_jsonc(text))


@functools.lru_cache(maxsize=16)
def _parse_jsonc(text: str):
    """JSON with comments and trailing commas (json5), with escaped surrogate pairs joined.

    Python's json.dump writes an emoji as "\\ud83d\\udfeb"; json5 keeps those as two lone
    surrogates, which no encoder accepts later. Join them into the character they mean.
    """
    import json5

    def join(value):
        if isinstance(value, str):
            return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        if isinstance(value, list):
            return [join(item) for item in value]
        if isinstance(value, dict):
            return {join(key): join(item) for key, item in value.items()}
        return value

    return join(json5.loads(text))
