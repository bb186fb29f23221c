"""The training loop's promises beyond the Chroma math: held-out loss users can compare, and what it reports."""

import json
import shutil
from pathlib import Path

import pytest
from dagster import DagsterInstance

import chroma_pipeline.train as train_module
from assets.definitions import materialize_chain
from chroma_pipeline.steps import Layout, training_samples
from chroma_pipeline.train import split_held_out
from tests.conftest import write_config

pytestmark = pytest.mark.slow


def test_held_out_samples_never_train_and_their_loss_is_the_same_number_for_the_same_adapter(small_project, monkeypatch):
    sampled = []
    bucket_batches = train_module.bucket_batches

    def recording(samples, *args, **kwargs):
        sampled.extend(s.latent.path for s in samples)
        return bucket_batches(samples, *args, **kwargs)

    monkeypatch.setattr(train_module, "bucket_batches", recording)
    values = json.loads(small_project.read_text())
    write_config(small_project, {**values, "validation_loss_share": 0.25, "validation_steps": 6, "max_train_steps": 12})
    instance = DagsterInstance.ephemeral()
    first = materialize_chain(str(small_project), instance, device="cpu")
    assert first.success
    metadata = first.asset_materializations_for_node("lora_adapter")[0].metadata
    adapter = Path(metadata["adapter"].value)
    measured = json.loads((adapter.parent / "validation_loss.json").read_text())
    assert [step for step, _ in measured] == [6, 12]
    assert metadata["validation loss"].value == measured[-1][1] > 0
    assert metadata["validation loss at step"].value == 12
    held = {s.latent.path for s in split_held_out(training_samples(Layout(adapter.parents[2]))[0], 0.25, 42)[1]}
    assert len(held) == 2 and not held & set(sampled) and len(set(sampled)) == 7  # 9 images: 7 train, 2 held out

    # Retraining from scratch with the same seed measures exactly the same numbers (fixed sigmas and noise).
    shutil.rmtree(adapter.parent)
    shutil.rmtree(adapter.parents[1].parent / "checkpoints", ignore_errors=True)
    again = materialize_chain(str(small_project), instance, selection=["lora_adapter"], device="cpu")
    assert json.loads((adapter.parent / "validation_loss.json").read_text()) == measured
    assert again.asset_materializations_for_node("lora_adapter")[0].metadata["validation loss"].value == measured[-1][1]


def test_the_split_is_stable_by_content_and_never_empties_training():
    from chroma_pipeline.latents import LatentEntry
    from chroma_pipeline.train import TrainingSample

    samples = [TrainingSample(LatentEntry(f"img{i}.png", f"sha{i}", 64, 64, f"k{i}"), f"e{i}") for i in range(8)]
    train, held = split_held_out(samples, 0.25, seed=42)
    assert len(held) == 2 and len(train) == 6 and not {id(s) for s in held} & {id(s) for s in train}
    renamed = [TrainingSample(LatentEntry(f"renamed{i}.png", s.latent.image_sha256, 64, 64, s.latent.cache_key), s.embedding_key)
               for i, s in enumerate(samples)]
    assert {s.latent.image_sha256 for s in split_held_out(renamed, 0.25, seed=42)[1]} == {s.latent.image_sha256 for s in held}
    assert split_held_out(samples, 0.0, seed=42) == (samples, [])
    with pytest.raises(ValueError, match="leaves none to train on"):
        split_held_out(samples[:1], 0.5, seed=42)
