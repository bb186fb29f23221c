"""Latent and embedding caches: only what changed is encoded, and a bad entry is never trusted."""

from pathlib import Path

import pytest
from diffusers import AutoencoderKL
from PIL import Image

import chroma_pipeline.text as text_module
from chroma_pipeline import models
from chroma_pipeline.config import load_config
from chroma_pipeline.device import detect_device
from chroma_pipeline.image_latents import build_latents
from chroma_pipeline.layout import Layout
from chroma_pipeline.raw_dataset import build_manifest
from chroma_pipeline.text_embeddings import build_embeddings
from tests.conftest import write_config


@pytest.fixture
def counters(monkeypatch):
    """Count images through the VAE encoder and texts through T5."""
    counts = {"images": 0, "texts": 0}
    original_encode = AutoencoderKL.encode

    def counting_encode(self, pixels, *args, **kwargs):
        counts["images"] += pixels.shape[0]
        return original_encode(self, pixels, *args, **kwargs)

    original_prompts = text_module.encode_prompts

    def counting_prompts(texts, *args, **kwargs):
        counts["texts"] += len(texts)
        return original_prompts(texts, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", counting_encode)
    monkeypatch.setattr(text_module, "encode_prompts", counting_prompts)
    return counts


def _run(config_path: Path):
    config = load_config(config_path)
    layout = Layout(Path(config.output_dir))
    build_manifest(config, layout)
    device = detect_device("cpu")
    return build_latents(config, layout, device, log=lambda _: None), build_embeddings(config, layout, device, log=lambda _: None)


def test_second_run_encodes_nothing_and_loads_no_model(small_project, counters, monkeypatch):
    first_latents, first_texts = _run(small_project)
    # 9 captions, the empty caption, 2 validation prompts; the negative prompt "" is the empty caption.
    assert counters == {"images": 9, "texts": 12}

    def no_model(*args, **kwargs):
        raise AssertionError("a warm cache must not load a model")

    monkeypatch.setattr(models, "load_vae", no_model)
    monkeypatch.setattr(models, "load_text_encoder", no_model)
    latents, texts = _run(small_project)
    assert counters["images"] == 9 and counters["texts"] == 12
    assert (latents.data_version, texts.data_version) == (first_latents.data_version, first_texts.data_version)
    assert latents.stats["reused"] == 9 and texts.stats["encoded"] == 0


def test_edited_caption_reencodes_exactly_that_caption(small_project, counters):
    _, first_texts = _run(small_project)
    caption = sorted((small_project.parent / "dataset").glob("*.txt"))[3]
    caption.write_text("a completely new caption")
    latents, texts = _run(small_project)
    assert counters["texts"] == 12 + 1
    assert counters["images"] == 9  # latents untouched
    assert texts.stats["encoded"] == 1 and texts.data_version != first_texts.data_version
    assert texts.stats["dropped"] == 1  # the old caption's entry left the index


def test_replaced_image_reencodes_exactly_that_image(small_project, counters):
    first_latents, _ = _run(small_project)
    image = sorted((small_project.parent / "dataset").glob("*.png"))[0]
    Image.new("RGB", Image.open(image).size, "pink").save(image)
    latents, texts = _run(small_project)
    assert counters["images"] == 9 + 1 and counters["texts"] == 12
    assert latents.stats["encoded"] == 1 and latents.data_version != first_latents.data_version


def test_adding_one_image_encodes_one_image(small_project, counters):
    _run(small_project)
    new = small_project.parent / "dataset" / "new.png"
    Image.new("RGB", (300, 200), "teal").save(new)
    new.with_suffix(".txt").write_text("a teal rectangle, new")
    latents, texts = _run(small_project)
    assert (latents.stats["encoded"], texts.stats["encoded"]) == (1, 1)
    assert counters["images"] == 9 + 1


def test_truncated_cache_shard_is_recomputed_not_trusted(small_project, counters):
    _run(small_project)
    (shard,) = (small_project.parent / "output" / "cache" / "latents").glob("*.safetensors")  # 9 images, one shard
    shard.write_bytes(shard.read_bytes()[:1000])
    latents, _ = _run(small_project)
    assert latents.stats["encoded"] == 9 and counters["images"] == 18
    again, _ = _run(small_project)
    assert again.stats["encoded"] == 0  # the new shard is trusted, the broken one no longer named


def test_changing_encoder_settings_reencodes_every_text(small_project, counters):
    _run(small_project)
    values = __import__("json").loads(small_project.read_text())
    write_config(small_project, {**values, "tokenizer_max_length": 32})
    _, texts = _run(small_project)
    assert texts.stats["encoded"] == 12 and counters["images"] == 9


def test_a_caption_cut_to_the_max_length_is_named_even_when_every_text_is_cached(small_project, monkeypatch):
    from chroma_pipeline import checks
    from chroma_pipeline.text import read_embedding_index, write_embedding_index

    caption = sorted((small_project.parent / "dataset").glob("*.txt"))[2]
    caption.write_text("a very long caption " * 100)  # the demo's tokenizer_max_length is 64
    config = load_config(small_project)
    layout = Layout(Path(config.output_dir))
    build_manifest(config, layout)
    device = detect_device("cpu")
    tokens = len(models.load_tokenizer(models.resolve_model_dir(config, layout.models_dir))(
        caption.read_text())["input_ids"])  # all of them: the real tokenizer, no truncation
    named = [(caption.with_suffix(".png").name, tokens)]
    warned = []
    first = build_embeddings(config, layout, device, log=lambda _: None, warn=warned.append)
    assert first.stats["over_long"] == named and tokens > 64
    assert len(warned) == 1 and f"{named[0][0]} ({tokens} tokens)" in warned[0]
    assert "tokenizer_max_length (64 tokens)" in warned[0] and "raise tokenizer_max_length" in warned[0]

    def no_model(*args, **kwargs):
        raise AssertionError("counting cached texts must not load a model")

    monkeypatch.setattr(models, "load_text_encoder", no_model)
    original_tokenizer = models.load_tokenizer
    monkeypatch.setattr(models, "load_tokenizer", no_model)
    again = build_embeddings(config, layout, device, log=lambda _: None, warn=warned.append)
    assert again.stats["encoded"] == 0 and again.stats["over_long"] == named  # the counts kept in the index
    outcome = checks.captions_fit_tokenizer_max_length(config, layout)
    assert not outcome.passed and outcome.problems == [f"{named[0][0]}: {tokens} tokens, cut to 64"]

    # An index written before counts were kept: the tokenizer alone counts, T5 stays unloaded.
    monkeypatch.setattr(models, "load_tokenizer", original_tokenizer)
    entries = read_embedding_index(layout.embedding_index)
    for entry in entries:
        entry.tokens = None
    write_embedding_index(entries, layout.embedding_index)
    assert checks.captions_fit_tokenizer_max_length(config, layout).problems == outcome.problems
    assert build_embeddings(config, layout, device, log=lambda _: None, warn=warned.append).stats["over_long"] == named


@pytest.mark.parametrize("padding", ["unmodified", "zero"])
def test_pruned_cache_gives_the_transformer_the_same_input_as_encoding_on_the_fly(tiny_model_dir, tmp_path, padding):
    import torch

    from chroma_pipeline import flow
    from chroma_pipeline.models import load_text_encoder, load_tokenizer, load_transformer
    from chroma_pipeline.text import encode_prompts, load_embedding, save_embedding

    tokenizer, encoder = load_tokenizer(tiny_model_dir), load_text_encoder(tiny_model_dir, torch.float32)
    on_the_fly, mask = encode_prompts(["a red circle on a blue background"], tokenizer, encoder, 512, padding, "cpu",
                                      torch.float32)
    size = save_embedding(tmp_path, "key", on_the_fly[0], mask[0])
    cached = load_embedding(tmp_path, "key", 512, 32)

    open_positions = int(mask.sum())
    assert torch.equal(cached["attention_mask"], mask[0])
    assert torch.equal(cached["prompt_embeds"][:open_positions], on_the_fly[0, :open_positions])
    if padding == "zero":
        assert torch.equal(cached["prompt_embeds"], on_the_fly[0])  # nothing was dropped but zeros
    else:
        assert not torch.equal(cached["prompt_embeds"], on_the_fly[0])  # closed positions differ, yet see below
    assert size < 0.1 * 512 * 32 * 4  # a 10-token caption does not pay for 512 positions

    transformer = load_transformer(tiny_model_dir, torch.float32).eval()
    noisy = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(0))
    ids = flow.image_position_ids(8, 8)
    with torch.no_grad():
        expected = flow.predict_velocity(transformer, noisy, torch.tensor([0.4]), on_the_fly, mask, ids)
        actual = flow.predict_velocity(transformer, noisy, torch.tensor([0.4]), cached["prompt_embeds"][None],
                                       cached["attention_mask"][None], ids)
    assert torch.equal(actual, expected)


def test_an_8bit_text_encoder_is_its_own_cache_and_stays_close(small_project, counters):
    import torch

    _run(small_project)
    values = __import__("json").loads(small_project.read_text())
    write_config(small_project, {**values, "text_encoder_precision": "int8-quanto"})
    _, texts = _run(small_project)
    assert texts.stats["encoded"] == 12  # a different encoder never reuses the full-precision cache

    from chroma_pipeline.text import load_embedding, read_embedding_index

    cache = small_project.parent / "output" / "cache"
    entries = [e for e in read_embedding_index(cache / "text_embeddings_index.parquet") if e.role == "caption"]
    eight_bit = load_embedding(cache / "text_embeddings", entries[0].cache_key, 64, 32)["prompt_embeds"]
    write_config(small_project, values)
    _run(small_project)
    entries = [e for e in read_embedding_index(cache / "text_embeddings_index.parquet") if e.role == "caption"]
    full = load_embedding(cache / "text_embeddings", entries[0].cache_key, 64, 32)["prompt_embeds"]
    assert 0 < ((eight_bit - full).norm() / full.norm()).item() < 0.05
    assert torch.isfinite(eight_bit).all()


def test_an_8bit_text_encoder_is_quantized_once_and_a_caption_edit_reads_it_back(small_project, monkeypatch):
    import chroma_pipeline.text_embeddings as step

    values = __import__("json").loads(small_project.read_text())
    write_config(small_project, {**values, "text_encoder_precision": "int8-quanto"})
    _run(small_project)
    saved = list((small_project.parent / "output" / "models" / "quantized_text_encoder").iterdir())
    assert len(saved) == 1 and (saved[0] / "manifest.json").is_file()

    monkeypatch.setattr(step, "quantize_model", lambda *args, **kwargs: pytest.fail("T5 was quantized again"))
    monkeypatch.setattr(models, "load_text_encoder", lambda *args: pytest.fail("the full-precision T5 was read"))
    caption = sorted((small_project.parent / "dataset").glob("*.txt"))[0]
    caption.write_text("one caption rewritten")
    _, texts = _run(small_project)
    assert texts.stats["encoded"] == 1


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_reloaded_8bit_text_encoder_computes_exactly_what_the_freshly_quantized_one_did(tmp_path, tiny_model_dir,
                                                                                           dtype):
    import torch

    from chroma_pipeline.text_embeddings import quantized_text_encoder

    dtype, layout, tokens = getattr(torch, dtype), Layout(tmp_path), torch.tensor([[5, 9, 17, 1, 0, 0]])
    fresh = quantized_text_encoder(tiny_model_dir, layout, dtype, "cpu", log=lambda _: None)
    reloaded = quantized_text_encoder(tiny_model_dir, layout, dtype, "cpu", log=lambda _: None)
    assert type(reloaded.encoder.block[0].layer[0].SelfAttention.q).__name__ == "QLinear"
    assert reloaded.shared.weight.dtype == dtype
    assert reloaded.encoder.embed_tokens.weight is reloaded.shared.weight  # tied as T5 ties them, saved once
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).last_hidden_state, fresh(tokens).last_hidden_state)


def test_the_text_encoder_is_freed_when_the_step_returns_without_a_garbage_collection(small_project, monkeypatch):
    # Training may run next in the same process: T5-XXL's 9.5 GB must not wait for the garbage collector.
    import gc
    import weakref

    load, loaded = models.load_text_encoder, []

    def watched_load(*args):
        encoder = load(*args)
        loaded.append(weakref.ref(encoder))
        return encoder

    monkeypatch.setattr(models, "load_text_encoder", watched_load)
    gc.disable()
    try:
        _run(small_project)
        assert len(loaded) == 1 and loaded[0]() is None
    finally:
        gc.enable()


@pytest.mark.slow
def test_an_8bit_t5_of_real_width_read_back_from_its_folder_encodes_as_the_fresh_one(tmp_path):
    # At T5-XXL's width, torch's CPU int8 matmul crashed the process (SIGSEGV) on weights used in place
    # from the safetensors file, whose tensors sit at unaligned offsets; the tiny T5 never showed it.
    import torch
    from transformers import T5Config, T5EncoderModel

    from chroma_pipeline.text_embeddings import quantized_text_encoder

    torch.manual_seed(0)
    config = T5Config(d_model=4096, d_ff=10240, num_heads=64, d_kv=64, num_layers=1, vocab_size=32128,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
    with torch.device("meta"):
        skeleton = T5EncoderModel(config)
    skeleton.to_empty(device="cpu").to(torch.bfloat16)
    for parameter in skeleton.parameters():
        torch.nn.init.normal_(parameter, std=0.02)
    skeleton.save_pretrained(tmp_path / "text_encoder")
    del skeleton
    layout, tokens = Layout(tmp_path / "output"), torch.tensor([[5, 9, 17, 1]])
    fresh = quantized_text_encoder(tmp_path, layout, torch.bfloat16, "cpu", log=lambda _: None)
    with torch.no_grad():
        expected = fresh(tokens).last_hidden_state
    del fresh
    reloaded = quantized_text_encoder(tmp_path, layout, torch.bfloat16, "cpu", log=lambda _: None)
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).last_hidden_state, expected)


def test_cleanup_reclaims_only_what_no_index_uses(small_project):
    from chroma_pipeline.cleanup import main, reclaim, unreferenced_files

    _run(small_project)
    layout = Layout(small_project.parent / "output")
    assert unreferenced_files(layout) == []
    image = sorted((small_project.parent / "dataset").glob("*.png"))[0]
    image.unlink()  # a removed image: its latent leaves the index but stays on disk
    caption = sorted((small_project.parent / "dataset").glob("*.txt"))[1]
    caption.write_text("a new caption")  # an edited caption: the old embedding is unreferenced
    leftover = layout.latent_dir / ".half-written.safetensors.abc.tmp"
    leftover.write_bytes(b"crash")  # a killed write: only ever made under the store's lock, which cleanup holds
    latents, texts = _run(small_project)

    # The removed image's caption embedding and the edited caption's old embedding.
    assert len(unreferenced_files(layout)) == 2
    predicted = reclaim(layout, dry_run=True)
    assert main(["--config", str(small_project), "--dry-run"]) == 0 and len(unreferenced_files(layout)) == 2
    shards_before = sum(p.stat().st_size for p in layout.latent_dir.glob("*.safetensors"))
    reclaimed = reclaim(layout)
    assert reclaimed.files == predicted.files == 2 + 2  # and the leftover, and the latent shard rewritten
    assert abs(reclaimed.bytes - predicted.bytes) < 1000  # without the removed image (a new header differs)
    assert unreferenced_files(layout) == [] and not leftover.exists()
    assert sum(p.stat().st_size for p in layout.latent_dir.glob("*.safetensors")) < shards_before
    again_latents, again_texts = _run(small_project)  # the live caches are intact
    assert again_latents.stats["encoded"] == 0 and again_texts.stats["encoded"] == 0


class _SmallMemoryVAE:
    """Runs out of memory on any batch larger than `limit`, as a small GPU would."""

    def __init__(self, limit):
        self.limit, self.batches = limit, []

    def encode(self, pixels):
        import torch
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        if pixels.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory")
        self.batches.append(pixels.shape[0])
        parameters = pixels[:, :2].repeat(1, 16, 1, 1) * 0 + torch.arange(pixels.shape[0]).view(-1, 1, 1, 1).float()
        return type("Output", (), {"latent_dist": DiagonalGaussianDistribution(parameters)})()


def test_out_of_memory_halves_the_batch_instead_of_skipping_images():
    import torch

    from chroma_pipeline.latents import encode_with_backoff

    vae = _SmallMemoryVAE(limit=2)
    pixels = torch.zeros(5, 3, 8, 8)
    mean, std = encode_with_backoff(vae, pixels, log=lambda _: None)
    assert mean.shape[0] == 5 and vae.batches == [2, 1, 2]  # 5 -> 2 + 3, and 3 -> 1 + 2
    with pytest.raises(torch.OutOfMemoryError, match="lower `resolution`"):
        encode_with_backoff(_SmallMemoryVAE(limit=0), torch.zeros(1, 3, 8, 8), log=lambda _: None)


def test_pairing_latents_with_captions_reads_three_columns_of_the_text_index_not_its_texts(tmp_path):
    # What training (and every check on the adapter) calls first; at 100k images reading the whole text index
    # held every caption once more (benchmarks/scale.py).
    import gc
    import tracemalloc

    from chroma_pipeline.latents import LatentEntry, write_latent_index
    from chroma_pipeline.lora_adapter import training_samples
    from chroma_pipeline.text import EmbeddingEntry, write_embedding_index

    layout, count = Layout(tmp_path), 20_000
    write_latent_index([LatentEntry(f"{i:06d}.png", f"{i:064x}", 64, 64, f"{i:024x}") for i in range(count)],
                       layout.latent_index)
    captions = [EmbeddingEntry(f"{i:064x}", "caption", f"{-i:024x}", f"a long caption, as real ones are, number {i} " * 3,
                               f"{i:06d}.png", 40) for i in range(count)]
    write_embedding_index([*captions, EmbeddingEntry("e" * 64, "empty", "0" * 24, "", "", 2)], layout.embedding_index)
    training_samples(layout)  # first-use allocations out of the way
    gc.collect()
    tracemalloc.start()
    samples, empty = training_samples(layout)
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert empty == "0" * 24 and len(samples) == count
    assert samples[7].latent.path == "000007.png" and samples[7].embedding_key == f"{-7:024x}"
    assert (peak - held) / count < 400  # bytes per sample beyond the samples: 600 reading whole rows, 190 now


@pytest.fixture
def tensor_reads(monkeypatch):
    """Count every cached tensor file or shard body read (headers are not counted)."""
    import chroma_pipeline.shards as shards_module
    import chroma_pipeline.storage as storage_module

    reads = {"latents": 0, "embeddings": 0}
    get, load = shards_module.ShardStore.get, storage_module.load_file

    def counted_get(store, *args, **kwargs):
        reads["latents"] += 1
        return get(store, *args, **kwargs)

    def counted_load(*args, **kwargs):
        reads["embeddings"] += 1
        return load(*args, **kwargs)

    monkeypatch.setattr(shards_module.ShardStore, "get", counted_get)
    monkeypatch.setattr(storage_module, "load_file", counted_load)
    return reads


def _checks(config_path: Path):
    from chroma_pipeline import checks

    config = load_config(config_path)
    layout = Layout(Path(config.output_dir))
    return checks.latents_complete_and_finite(config, layout), checks.embeddings_follow_mask_rule(config, layout)


def test_a_no_op_rerun_and_its_checks_read_no_cached_tensor(small_project, tensor_reads):
    _run(small_project)
    latents_check, texts_check = _checks(small_project)  # after an encode: everything just written is read back
    assert latents_check.passed and latents_check.counts["read back"] == 9
    assert texts_check.passed and texts_check.counts["read back"] == 13  # 12 texts; the empty one has two roles

    _run(small_project)
    tensor_reads.update(latents=0, embeddings=0)
    latents_check, texts_check = _checks(small_project)
    assert latents_check.passed and texts_check.passed
    assert latents_check.counts["read back"] == texts_check.counts["read back"] == 0
    _run(small_project)
    assert tensor_reads == {"latents": 0, "embeddings": 0}  # shard and file headers only


def test_after_one_caption_edit_the_check_reads_back_that_caption_only(small_project, tensor_reads):
    _run(small_project)
    caption = sorted((small_project.parent / "dataset").glob("*.txt"))[2]
    caption.write_text("one caption rewritten")
    _run(small_project)
    tensor_reads.update(latents=0, embeddings=0)
    _, texts_check = _checks(small_project)
    assert texts_check.passed and texts_check.counts["read back"] == 1 and tensor_reads["embeddings"] == 1


def test_a_latent_that_was_nan_when_encoded_fails_its_check_and_is_encoded_again_next_run(small_project, monkeypatch,
                                                                                       counters):
    import torch

    from chroma_pipeline import latents as latents_module

    encode = latents_module.encode_with_backoff

    def first_image_nan(vae, pixels, log=print):
        mean, std = encode(vae, pixels, log)
        if not getattr(first_image_nan, "done", False):
            first_image_nan.done = True
            mean = torch.full_like(mean, float("nan"))
        return mean, std

    monkeypatch.setattr(latents_module, "encode_with_backoff", first_image_nan)
    _run(small_project)
    latents_check, _ = _checks(small_project)
    assert not latents_check.passed and "not finite" in latents_check.problems[0]
    monkeypatch.setattr(latents_module, "encode_with_backoff", encode)  # the overflow does not recur
    _run(small_project)
    assert counters["images"] == 9 + 1  # that image again, no other
    latents_check, _ = _checks(small_project)
    assert latents_check.passed and latents_check.counts["read back"] == 1


def test_deep_cache_checks_read_every_tensor(small_project):
    _run(small_project)
    _run(small_project)
    values = __import__("json").loads(small_project.read_text())
    write_config(small_project, {**values, "deep_cache_checks": True})
    latents_check, texts_check = _checks(small_project)
    assert latents_check.counts["read back"] == 9 and texts_check.counts["read back"] == 13


def test_a_no_op_rerun_rewrites_no_index(small_project):
    _run(small_project)
    _run(small_project)  # the first re-run clears the "encoded by the last run" flags
    output = small_project.parent / "output"
    indexes = [output / "dataset" / "manifest.parquet", output / "cache" / "latents_index.parquet",
               output / "cache" / "text_embeddings_index.parquet"]
    written = [path.stat().st_mtime_ns for path in indexes]
    _run(small_project)
    assert [path.stat().st_mtime_ns for path in indexes] == written
    caption = sorted((small_project.parent / "dataset").glob("*.txt"))[0]
    caption.write_text("one caption rewritten")
    _run(small_project)
    assert [path.stat().st_mtime_ns != before for path, before in zip(indexes, written, strict=True)] == [True, False, True]
