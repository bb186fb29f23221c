"""The training loop's promises beyond the Chroma math: held-out loss users can compare, and what it reports."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from dagster import DagsterInstance
from safetensors.torch import load_file

import chroma_pipeline.training as train_module
from assets.definitions import materialize_chain
from chroma_pipeline.layout import Layout
from chroma_pipeline.lora_adapter import training_samples
from chroma_pipeline.training import split_held_out
from tests.conftest import CACHE_STEPS, write_config

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
    from chroma_pipeline.training import TrainingSample

    samples = [TrainingSample(LatentEntry(f"img{i}.png", f"sha{i}", 64, 64, f"k{i}"), f"e{i}") for i in range(8)]
    train, held = split_held_out(samples, 0.25, seed=42)
    assert len(held) == 2 and len(train) == 6 and not {id(s) for s in held} & {id(s) for s in train}
    renamed = [TrainingSample(LatentEntry(f"renamed{i}.png", s.latent.image_sha256, 64, 64, s.latent.cache_key), s.embedding_key)
               for i, s in enumerate(samples)]
    assert {s.latent.image_sha256 for s in split_held_out(renamed, 0.25, seed=42)[1]} == {s.latent.image_sha256 for s in held}
    assert split_held_out(samples, 0.0, seed=42) == (samples, [])
    with pytest.raises(ValueError, match="leaves none to train on"):
        split_held_out(samples[:1], 0.5, seed=42)


def test_repeats_and_epochs_decide_what_an_epoch_is():
    from chroma_pipeline.config import config_from_dict
    from chroma_pipeline.latents import LatentEntry
    from chroma_pipeline.training import TrainingSample, bucket_batches, total_steps

    square = [TrainingSample(LatentEntry(f"s{i}.png", f"s{i}", 64, 64, f"s{i}"), "e") for i in range(3)]
    wide = [TrainingSample(LatentEntry(f"w{i}.png", f"w{i}", 128, 64, f"w{i}"), "e") for i in range(2)]
    samples = square + wide
    batches = bucket_batches(samples, batch_size=2, seed=1, repeats=2)
    first_epoch = [next(batches) for _ in range(5 + 3)]  # ceil(9 / 2) + ceil(6 / 2)
    seen = sorted(i for batch in first_epoch for i in batch)
    assert seen == sorted(list(range(5)) * 3)  # every sample 1 + repeats times
    assert all(len({samples[i].latent.bucket_width for i in batch}) == 1 for batch in first_epoch)  # one bucket per batch
    config = config_from_dict({"num_train_epochs": 4, "repeats": 2, "train_batch_size": 2, "gradient_accumulation_steps": 2})
    assert total_steps(config, samples) == 4 * 4  # 8 batches an epoch, 2 per step
    assert total_steps(config, samples, processes=2) == 4 * 2  # two ranks share each epoch
    assert total_steps(config_from_dict({"max_train_steps": 7}), samples) == 7


def test_adamw8bit_on_a_cpu_says_what_to_use_instead():
    from chroma_pipeline.config import config_from_dict
    from chroma_pipeline.training import make_optimizer

    with pytest.raises(RuntimeError, match="needs bitsandbytes on a CUDA or ROCm GPU.*use 'adamw'"):
        make_optimizer(config_from_dict({"optimizer": "adamw8bit"}), [torch.nn.Parameter(torch.zeros(2))], "cpu")


def test_dropout_optimizer_targets_and_starting_from_an_existing_lora(small_project, tmp_path):
    from safetensors import safe_open

    from chroma_pipeline.config import load_config
    from chroma_pipeline.device import detect_device
    from chroma_pipeline.lora_adapter import build_adapter

    assert materialize_chain(str(small_project), DagsterInstance.ephemeral(), selection=CACHE_STEPS, device="cpu").success
    values = {**json.loads(small_project.read_text()), "max_train_steps": 3, "validation_steps": 0}

    def train(**settings):
        config = load_config(write_config(small_project, {**values, **settings}))
        result = build_adapter(config, Layout(Path(config.output_dir)), detect_device("cpu"), log=lambda _m: None)
        return result.path, load_file(result.path)

    path, weights = train(optimizer="adafactor", lora_dropout=0.1, flux_lora_target=["attn.to_q", "attn.to_v"])
    assert weights and all(".to_q." in k or ".to_v." in k for k in weights)
    assert any(k.startswith("transformer.single_transformer_blocks.") for k in weights)
    with safe_open(path, "pt") as handle:
        assert json.loads(handle.metadata()["lora_adapter_metadata"])["transformer.lora_dropout"] == 0.1

    # init_lora: the new run starts from those weights (a vanishing learning rate leaves them unchanged).
    _, started = train(flux_lora_target=["attn.to_q", "attn.to_v"], init_lora=str(path), learning_rate=1e-30)
    assert started.keys() == weights.keys()
    for name in weights:
        torch.testing.assert_close(started[name], weights[name])
    with pytest.raises(ValueError, match="does not fit this LoRA"):
        train(init_lora=str(path), learning_rate=1e-30)  # the default targets have layers the file lacks

    # A file trained at another alpha / rank starts at its own strength: B is rescaled to our alpha.
    strong_path, strong = train(flux_lora_target=["attn.to_q"], lora_alpha=32, learning_rate=1e-30)  # rank 8
    _, started = train(flux_lora_target=["attn.to_q"], init_lora=str(strong_path), learning_rate=1e-30)
    for name in (k for k in started if "lora_B" in k):
        torch.testing.assert_close(started[name], strong[name] * 4)  # (32 / 8) / (8 / 8)


def test_progress_renders_work_in_bf16_where_accelerate_makes_the_transformer_return_fp32(tiny_model_dir):
    """On a GPU `prepare` wraps the transformer's forward in autocast and returns fp32; the renders made
    while training must still decode with the bf16 VAE (they run under `accelerator.autocast()`).
    The CPU computes in fp32 in real runs; bf16 here only reproduces the GPU's dtypes."""
    from chroma_pipeline import grid, models
    from chroma_pipeline.device import detect_device
    from chroma_pipeline.distributed import make_accelerator

    accelerator = make_accelerator(detect_device("cpu"), torch.bfloat16, 1)
    transformer = models.load_transformer(tiny_model_dir, torch.bfloat16)
    accelerator.prepare(transformer)
    pipe = grid.make_pipeline(transformer, models.load_vae(tiny_model_dir, torch.bfloat16),
                              models.load_scheduler(tiny_model_dir))
    pipe.set_progress_bar_config(disable=True)
    width = models.text_width(tiny_model_dir)
    text = (torch.randn(8, width), torch.ones(8, dtype=torch.long))
    options = dict(prompts=["p"], embeddings={"p": text}, negative=text, seeds=[0], guidance=1.0, steps=2, size=64,
                   device="cpu")
    with pytest.raises(RuntimeError, match="should be the same"):  # what a bare render hits
        grid.render(pipe, "step 1", **options)
    with accelerator.autocast():
        cells = grid.render(pipe, "step 1", **options)
    assert len(cells) == 1 and not cells[0].non_finite
