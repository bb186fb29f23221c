"""A caching run killed at any moment loses at most one chunk, and the next run resumes from what it kept.

Each test kills a real caching process (`tests/crash_worker.py`) with SIGKILL, part-way
through encoding or in the middle of a write, then checks what a user relies on: the
re-run reuses everything committed before the kill, every entry it then holds is exactly
what an uninterrupted run makes, and `cleanup` leaves nothing behind that no index names.
"""

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chroma_pipeline import models
from chroma_pipeline.cleanup import reclaim
from chroma_pipeline.config import load_config
from chroma_pipeline.demo_data import demo_config, make_demo_dataset
from chroma_pipeline.device import detect_device
from chroma_pipeline.image_latents import build_latents
from chroma_pipeline.latents import ENTRY_TENSORS, read_latent_index
from chroma_pipeline.layout import Layout
from chroma_pipeline.raw_dataset import build_manifest
from chroma_pipeline.shards import ShardStore
from chroma_pipeline.text import entry_file, load_embedding, read_embedding_index
from chroma_pipeline.text_embeddings import build_embeddings
from tests.conftest import write_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
IMAGES = 16
ONE_CHUNK = 1  # the worker commits every entry as its own chunk


def _width(config) -> int:
    return models.text_width(models.resolve_model_dir(config, Layout(Path(config.output_dir)).models_dir))


def _project(root: Path, name: str) -> Path:
    values = demo_config(root / "dataset", root / name)
    config_path = write_config(root / f"{name}.json", values)
    config = load_config(config_path)
    build_manifest(config, Layout(Path(config.output_dir)))
    return config_path


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("crash")
    make_demo_dataset(root / "dataset", count=IMAGES)
    return root


@pytest.fixture(scope="module")
def reference(dataset_root):
    """What an uninterrupted run caches: latents by image, embeddings by text."""
    config = load_config(_project(dataset_root, "reference"))
    layout, cpu = Layout(Path(config.output_dir)), detect_device("cpu")
    build_latents(config, layout, cpu, log=lambda _: None)
    build_embeddings(config, layout, cpu, log=lambda _: None)
    store = ShardStore(layout.latent_dir)
    latents = {e.path: store.get(e.cache_key, ENTRY_TENSORS) for e in read_latent_index(layout.latent_index)}
    embeddings = {e.text: load_embedding(layout.embedding_dir, e.cache_key, config.tokenizer_max_length, _width(config))
                  for e in read_embedding_index(layout.embedding_index)}
    return latents, embeddings


def _worker(step: str, config_path: Path, *kill: str, kill_after: int | None = None):
    """Run the worker; with `kill_after`, SIGKILL it once it has logged that many encoded entries.

    Returns (return code, the highest "encoded k/N" it logged, its stats when it finished).
    """
    process = subprocess.Popen([sys.executable, "-m", "tests.crash_worker", step, str(config_path), *kill],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    encoded, stats = 0, None
    for line in process.stdout:
        if match := re.match(r"encoded (\d+)/\d+", line):
            encoded = int(match.group(1))
            if kill_after is not None and encoded >= kill_after:
                process.send_signal(signal.SIGKILL)
        elif line.startswith("{"):
            stats = json.loads(line)
    return process.wait(), encoded, stats


def _leftovers(root: Path) -> list[Path]:
    return sorted(root.rglob(".*.tmp"))


def _unmapped_shards(layout: Layout) -> set[str]:
    mapped = set(ShardStore(layout.latent_dir).mapping.values())
    return {p.name for p in layout.latent_dir.glob("*.safetensors")} - mapped


LATENT_KILLS = {
    "from outside, between entries": (("slow",), 6),
    "half-way through writing a shard": (("mid-file", "6"), None),
    "after a shard is in place, before the map names it": (("before-map", "6"), None),
    "half-way through writing the shard map": (("mid-map", "6"), None),
}


@pytest.mark.parametrize("moment", list(LATENT_KILLS))
def test_a_killed_latent_run_resumes_from_its_last_committed_chunk(moment, dataset_root, reference, tmp_path):
    kill, kill_after = LATENT_KILLS[moment]
    config_path = _project(dataset_root, f"latents-{kill[0]}")
    layout = Layout(Path(load_config(config_path).output_dir))

    code, encoded_before_kill, _ = _worker("image_latents", config_path, *kill, kill_after=kill_after)
    assert code == -signal.SIGKILL
    committed = set(ShardStore(layout.latent_dir).mapping)
    assert len(committed) >= encoded_before_kill - ONE_CHUNK
    assert not layout.latent_index.exists()  # the index is written only when the step completes

    reclaim(layout)  # cleanup between the kill and the re-run keeps the killed run's work...
    assert set(ShardStore(layout.latent_dir).mapping) == committed
    assert _leftovers(layout.root) == [] and _unmapped_shards(layout) == set()  # ...and removes its debris

    code, _, stats = _worker("image_latents", config_path)
    assert code == 0
    assert stats["reused"] == len(committed) and stats["reused"] + stats["encoded"] == IMAGES
    assert stats["reused"] >= encoded_before_kill - ONE_CHUNK
    print(f"latents killed {moment}: logged {encoded_before_kill} encoded, re-run reused {stats['reused']}, "
          f"encoded {stats['encoded']}")
    store = ShardStore(layout.latent_dir)
    latents, _ = reference
    for entry in read_latent_index(layout.latent_index):  # every entry is exactly what a clean run makes
        cached = store.get(entry.cache_key, ENTRY_TENSORS)
        assert all(torch.equal(cached[name], latents[entry.path][name]) for name in ENTRY_TENSORS), entry.path

    reclaim(layout)
    assert _leftovers(layout.root) == [] and _unmapped_shards(layout) == set()


EMBEDDING_KILLS = {
    "from outside, between batches": (("slow",), 8),
    "half-way through writing an embedding": (("mid-file", "5"), None),
}


@pytest.mark.parametrize("moment", list(EMBEDDING_KILLS))
def test_a_killed_embedding_run_keeps_every_embedding_written_before_the_kill(moment, dataset_root, reference):
    kill, kill_after = EMBEDDING_KILLS[moment]
    config_path = _project(dataset_root, f"texts-{kill[0]}")
    config = load_config(config_path)
    layout = Layout(Path(config.output_dir))

    code, encoded_before_kill, _ = _worker("text_embeddings", config_path, *kill, kill_after=kill_after)
    assert code == -signal.SIGKILL
    written = sorted(layout.embedding_dir.rglob("*.safetensors"))
    assert len(written) >= encoded_before_kill  # each embedding is its own file, renamed into place when complete
    reclaim(layout)
    assert _leftovers(layout.root) == [] and sorted(layout.embedding_dir.rglob("*.safetensors")) == written

    code, _, stats = _worker("text_embeddings", config_path)
    assert code == 0 and stats["reused"] == len(written)
    print(f"embeddings killed {moment}: logged {encoded_before_kill} encoded, re-run reused {stats['reused']}, "
          f"encoded {stats['encoded']}")
    _, embeddings = reference
    for entry in read_embedding_index(layout.embedding_index):
        cached = load_embedding(layout.embedding_dir, entry.cache_key, config.tokenizer_max_length, _width(config))
        assert torch.equal(cached["prompt_embeds"], embeddings[entry.text]["prompt_embeds"]), entry.text
        assert torch.equal(cached["attention_mask"], embeddings[entry.text]["attention_mask"])
    reclaim(layout)
    indexed = {entry_file(layout.embedding_dir, e.cache_key) for e in read_embedding_index(layout.embedding_index)}
    assert set(layout.embedding_dir.rglob("*.safetensors")) == indexed and _leftovers(layout.root) == []
