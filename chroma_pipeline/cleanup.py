"""Reclaim the disk of cache entries no index points to any more.

Re-materializing drops removed or changed images and captions from the indexes but keeps
their files, so a step undone (a caption edited back, a setting reverted) is free. This
command deletes what no current index references, plus temporary files a crash left:

    python -m chroma_pipeline.cleanup --config my-config.jsonc [--dry-run]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

from .latents import ENTRY_TENSORS, read_latent_index
from .layout import Layout
from .shards import ORPHAN_AGE_SECONDS, ShardStore
from .text import entry_file as embedding_file
from .text import read_embedding_index


@dataclass
class Reclaimed:
    files: int = 0
    bytes: int = 0


def unreferenced_files(layout: Layout) -> list[Path]:
    """Embedding files no index names, and leftovers of interrupted atomic writes.

    Latents live in shards; `reclaim` compacts those.
    """
    keep = set()
    if layout.embedding_index.is_file():
        keep |= {embedding_file(layout.embedding_dir, e.cache_key) for e in read_embedding_index(layout.embedding_index)}
    stale = []
    if layout.embedding_dir.is_dir():
        stale += [p for p in layout.embedding_dir.rglob("*") if p.is_file() and p not in keep]
    if layout.root.is_dir():  # an atomic write in progress is young; one a crash left behind is old
        old_enough = time.time() - ORPHAN_AGE_SECONDS
        stale += [p for p in layout.root.rglob(".*.tmp") if p.is_file() and p.stat().st_mtime < old_enough]
    return sorted(set(stale))


def reclaim(layout: Layout, dry_run: bool = False) -> Reclaimed:
    result = Reclaimed()
    for path in unreferenced_files(layout):
        result.files += 1
        result.bytes += path.stat().st_size
        if not dry_run:
            path.unlink()
    if not dry_run and layout.latent_index.is_file():
        live = {e.cache_key for e in read_latent_index(layout.latent_index)}
        files, freed = ShardStore(layout.latent_dir).compact(live, ENTRY_TENSORS)
        result.files += files
        result.bytes += freed
    return result


def main(argv: list[str] | None = None) -> int:
    from .config import load_config

    parser = argparse.ArgumentParser(prog="python -m chroma_pipeline.cleanup", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")
    args = parser.parse_args(argv)
    layout = Layout(Path(load_config(args.config).output_dir))
    if args.dry_run:
        for path in unreferenced_files(layout):
            print(path)
    result = reclaim(layout, dry_run=args.dry_run)
    verb = "would free" if args.dry_run else "freed"
    print(f"{result.files} unreferenced cache files, {verb} {result.bytes / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
