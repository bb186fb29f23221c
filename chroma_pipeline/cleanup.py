"""Reclaim the disk of cache entries no index points to any more.

Re-materializing drops removed or changed images and captions from the indexes but keeps
their files, so a step undone (a caption edited back, a setting reverted) is free. This
command deletes what no current index references, plus temporary files a killed process
left. Entries written after their index (by a run that has not finished, or was killed
and will resume) are kept:

    python -m chroma_pipeline.cleanup --config my-config.jsonc [--dry-run]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from .errors import run_command
from .latents import ENTRY_TENSORS, read_latent_index
from .layout import Layout
from .shards import ShardStore
from .storage import left_by_dead_writer
from .text import entry_file as embedding_file
from .text import read_embedding_index


@dataclass
class Reclaimed:
    files: int = 0
    bytes: int = 0


def unreferenced_files(layout: Layout) -> list[Path]:
    """Embedding files no index names, and temporary files of writes whose process is gone.

    Latents live in shards; `reclaim` compacts those (their leftovers included).
    """
    stale = []
    if layout.embedding_dir.is_dir() and layout.embedding_index.is_file():
        keep = {embedding_file(layout.embedding_dir, e.cache_key) for e in read_embedding_index(layout.embedding_index)}
        indexed_at = layout.embedding_index.stat().st_mtime
        stale += [p for p in layout.embedding_dir.rglob("*.safetensors")
                  if p not in keep and p.stat().st_mtime <= indexed_at]
    if layout.root.is_dir():
        stale += [p for p in layout.root.rglob(".*.tmp")
                  if p.is_file() and layout.latent_dir not in p.parents and left_by_dead_writer(p)]
    return sorted(set(stale))


def reclaim(layout: Layout, dry_run: bool = False) -> Reclaimed:
    result = Reclaimed()
    for path in unreferenced_files(layout):
        result.files += 1
        result.bytes += path.stat().st_size
        if not dry_run:
            path.unlink()
    if layout.latent_dir.is_dir():
        if layout.latent_index.is_file():
            live = {e.cache_key for e in read_latent_index(layout.latent_index)}
            indexed_at = layout.latent_index.stat().st_mtime
        else:  # the first latents run has not finished: every committed entry is its work so far
            live, indexed_at = set(), 0.0
        files, freed = ShardStore(layout.latent_dir).compact(live, ENTRY_TENSORS, dry_run=dry_run,
                                                             keep_newer_than=indexed_at)
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
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {result.files} unreferenced cache files (latent shards rewritten without their dead entries "
          f"included), {'would free' if args.dry_run else 'freed'} {result.bytes / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_command(main, "python -m chroma_pipeline.cleanup"))
