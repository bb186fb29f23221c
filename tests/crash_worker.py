"""One caching step in its own process, made to die at a chosen moment (for tests/test_crash_resume.py).

    python -m tests.crash_worker STEP CONFIG [KILL_POINT N]

STEP is `image_latents` or `text_embeddings`. Entries are committed one by one (a chunk
of one entry), so the test can count exactly what a kill may lose. KILL_POINT:

- `slow`: every encode takes 0.3 s more, so the test can SIGKILL the process from outside;
- `mid-file`: the N-th safetensors file (a shard, or an embedding) is half written when the process dies;
- `before-map`: the N-th shard is in place, but the process dies before the shard map names it;
- `mid-map`: the N-th shard map write is half done when the process dies.

The step's log goes to stdout; its stats are the last line, as JSON.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import types
from pathlib import Path


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _half_written(path: str) -> None:
    size = Path(path).stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(size // 2)


def _on_nth_call(n: int, action):
    calls = {"count": 0}

    def maybe(*args):
        calls["count"] += 1
        if calls["count"] == n:
            action(*args)

    return maybe


def arm(kill_point: str, n: int) -> None:
    import pyarrow.parquet as pq
    from diffusers import AutoencoderKL

    from chroma_pipeline import shards, storage, text

    if kill_point == "slow":
        encode, prompts = AutoencoderKL.encode, text.encode_prompts

        def slow_encode(*args, **kwargs):
            time.sleep(0.3)
            return encode(*args, **kwargs)

        def slow_prompts(*args, **kwargs):
            time.sleep(0.3)
            return prompts(*args, **kwargs)

        AutoencoderKL.encode, text.encode_prompts = slow_encode, slow_prompts
    elif kill_point == "mid-file":
        save_file, check = storage.save_file, _on_nth_call(n, lambda path: (_half_written(path), _die()))

        def save_then_maybe_die(tensors, path, metadata=None):
            save_file(tensors, path, metadata=metadata)
            check(path)

        storage.save_file = save_then_maybe_die
    elif kill_point == "before-map":
        write_map, check = shards.ShardStore._write_map, _on_nth_call(n, lambda: _die())

        def die_or_write(store):
            check()
            write_map(store)

        shards.ShardStore._write_map = die_or_write
    elif kill_point == "mid-map":
        check = _on_nth_call(n, lambda path: (_half_written(path), _die()))

        def write_then_maybe_die(table, path, **kwargs):
            pq.write_table(table, path, **kwargs)
            check(path)

        shards.pq = types.SimpleNamespace(read_table=pq.read_table, write_table=write_then_maybe_die)
    else:
        raise SystemExit(f"unknown kill point {kill_point!r}")


def main(argv: list[str]) -> int:
    step, config_path, *kill = argv
    from chroma_pipeline import shards
    from chroma_pipeline.config import load_config
    from chroma_pipeline.device import detect_device
    from chroma_pipeline.image_latents import build_latents
    from chroma_pipeline.layout import Layout
    from chroma_pipeline.text_embeddings import build_embeddings

    shards.CHUNK_SECONDS = 0  # every entry is committed as its own chunk
    if kill:
        arm(kill[0], int(kill[1]) if len(kill) > 1 else 0)
    config = load_config(config_path)
    build = {"image_latents": build_latents, "text_embeddings": build_embeddings}[step]
    result = build(config, Layout(Path(config.output_dir)), detect_device("cpu"), log=lambda m: print(m, flush=True))
    print(json.dumps({k: v for k, v in result.stats.items() if isinstance(v, int)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
