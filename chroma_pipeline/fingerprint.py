"""A content fingerprint of the dataset folder: has anything the scan reads changed?

The folder watcher and the nightly schedule ask this every few minutes, so each file's
hash is remembered by (size, mtime, inode) and only files whose stat changed are read
again. A `touch` re-hashes one file and finds the same bytes: no change. A copy, an
edit or a rename gives a new fingerprint.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .dataset import IMAGE_SUFFIXES, files_under, is_inside
from .storage import combine_hashes, sha256_file, write_json_atomic

# Everything the scan can read: images, caption files and metadata tables.
WATCHED_SUFFIXES = IMAGE_SUFFIXES | {".txt", ".jsonl", ".csv", ".parquet", ".arrow"}  # .arrow: a saved HF dataset


@dataclass
class Fingerprint:
    version: str  # one hash over every watched file's path and content
    files: dict[str, str]  # relative path -> content sha256 (or "link:<target>" for a link out of the root)
    hashed: int = 0  # files read this time (the rest came from the memo)

    def changes_since(self, previous: dict[str, str]) -> dict[str, list[str]]:
        return {
            "added": sorted(self.files.keys() - previous.keys()),
            "removed": sorted(previous.keys() - self.files.keys()),
            "modified": sorted(p for p in self.files.keys() & previous.keys() if self.files[p] != previous[p]),
        }


@dataclass
class _Memo:
    path: Path | None
    entries: dict[str, list] = field(default_factory=dict)  # relative path -> [size, mtime_ns, inode, sha256]

    @classmethod
    def load(cls, path: Path | None) -> _Memo:
        if path is None or not path.is_file():
            return cls(path)
        try:
            return cls(path, json.loads(path.read_text()))
        except (ValueError, OSError):
            return cls(path)  # a damaged memo only costs re-hashing

    def save(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, self.entries)


def fingerprint_dataset(root: Path, memo_path: Path | None = None) -> Fingerprint:
    """Fingerprint every watched file under `root`; `memo_path` keeps hashes between calls."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"instance_data_dir {root} is not a folder; set it to the folder of your images")
    memo = _Memo.load(memo_path)
    files: dict[str, str] = {}
    fresh: dict[str, list] = {}
    hashed = 0
    names, links = files_under(root, WATCHED_SUFFIXES)
    for relative in names:
        path = root / relative
        if relative in links and not is_inside(path, root):
            # Never read outside the dataset root (the scan skips such files too): where the link
            # points is what can change here.
            files[relative] = f"link:{os.readlink(path)}" if path.is_symlink() else "outside root"
            continue
        try:
            if not path.is_file():
                continue
            stat = path.stat()
        except OSError:  # deleted while we walked the folder: the next call sees it gone
            continue
        signature = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        remembered = memo.entries.get(relative)
        if remembered and remembered[:3] == signature:
            digest = remembered[3]
        else:
            digest = sha256_file(path)
            hashed += 1
        files[relative] = digest
        fresh[relative] = [*signature, digest]
    if fresh != memo.entries:
        memo.entries = fresh
        memo.save()
    return Fingerprint(combine_hashes(*(f"{p}:{h}" for p, h in files.items())), files, hashed)


def fingerprint_config_datasets(config, memo_path: Path) -> Fingerprint:
    """The fingerprint of every dataset the config trains on, their files named by sample path.

    Also the caption tables a dataloader file names outside its dataset folder: editing
    one is a caption change. One memo per dataset, since relative paths can repeat across them.
    """
    datasets = config.image_datasets
    if not config.named_datasets:
        return fingerprint_dataset(Path(datasets[0].root), memo_path)
    files, hashed = {}, 0
    for dataset in datasets:
        if dataset.type == "huggingface" and not dataset.root.is_dir():  # a Hub id: its revision is the Hub's business
            files[f"{dataset.id}:"] = f"hub:{dataset.dataset_name}:{dataset.split}"
            continue
        part = fingerprint_dataset(dataset.root, memo_path.with_name(f"{memo_path.stem}.{dataset.id}{memo_path.suffix}"))
        files.update({f"{dataset.id}/{name}": digest for name, digest in part.files.items()})
        hashed += part.hashed
        if dataset.parquet and Path(dataset.parquet.path).is_file():
            files[f"{dataset.id}:{dataset.parquet.path}"] = sha256_file(Path(dataset.parquet.path))
    return Fingerprint(combine_hashes(*(f"{p}:{h}" for p, h in sorted(files.items()))), files, hashed)


def summarize(changes: dict[str, list[str]], limit: int = 20) -> str:
    """'1 modified (cat.txt), 2 added (a.png, b.png)' for logs and the UI."""
    parts = []
    for kind in ("modified", "added", "removed"):
        names = changes[kind]
        if names:
            shown = ", ".join(names[:limit]) + (f", … {len(names) - limit} more" if len(names) > limit else "")
            parts.append(f"{len(names)} {kind} ({shown})")
    return "; ".join(parts) or "no file changed"
