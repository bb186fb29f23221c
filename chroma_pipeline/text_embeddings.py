"""Step `text_embeddings`: masked T5 embeddings of every caption, the empty caption and the validation prompts.

Later steps read the prompts' embeddings from this cache (`cached_prompts`), so T5 is
loaded only when a text is new.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from . import models
from .config import ChromaConfig
from .dataset import ManifestRow, read_manifest, usable
from .device import DeviceInfo
from .layout import Layout, StepResult
from .quantize import is_complete, load_quantized_module, quantize_model, quanto_version, save_quantized_module
from .storage import combine_hashes
from .text import EmbeddingEntry, encode_texts, load_embedding, read_embedding_index, write_embedding_index

SETTINGS = (
    "output_dir", *models.MODEL_SETTINGS, "tokenizer_max_length", "flux_t5_padding", "text_encoder_precision",
    "validation_prompts", "validation_negative_prompt",
)


def texts_to_encode(config: ChromaConfig, rows: list[ManifestRow]) -> list[tuple[str, str, str]]:
    """Captions, the empty caption (for caption dropout and CFG), validation and negative prompts."""
    texts = [("caption", row.caption, row.path) for row in rows]
    texts.append(("empty", "", ""))
    texts += [("validation", prompt, "") for prompt in config.validation_prompts]
    texts.append(("negative", config.validation_negative_prompt, ""))
    return texts


def text_name(entry: EmbeddingEntry) -> str:
    """How a message names a text: a caption by its image file, a prompt by its start."""
    return entry.path if entry.role == "caption" else f"{entry.role} prompt {entry.text[:40]!r}"


def over_long_texts(entries: list[EmbeddingEntry], max_length: int) -> list[tuple[str, int]]:
    """(file or prompt, tokens) of each text longer than `max_length` tokens: T5 saw only its first `max_length`."""
    return [(text_name(e), e.tokens) for e in entries if e.tokens is not None and e.tokens > max_length]


def over_long_message(over_long: list[tuple[str, int]], max_length: int) -> str:
    """What a cut text means and what to do, naming the first files."""
    shown = ", ".join(f"{name} ({tokens} tokens)" for name, tokens in over_long[:10])
    more = f" and {len(over_long) - 10} more" if len(over_long) > 10 else ""
    fix = ("raise tokenizer_max_length (at most 512) or shorten them" if max_length < 512
           else "shorten them (T5 reads at most 512 tokens)")
    return (f"{len(over_long)} texts are longer than tokenizer_max_length ({max_length} tokens) and were cut to it, "
            f"so training never sees their end: {shown}{more}. To use all of each, {fix}.")


def build_embeddings(config: ChromaConfig, layout: Layout, device: DeviceInfo, log=print, warn=None) -> StepResult:
    """`warn` (default: `log`, marked) hears what the user should act on, e.g. captions cut to the max length."""
    warn = warn or (lambda message: log(f"warning: {message}"))
    rows = usable(read_manifest(layout.manifest))
    model_dir = models.resolve_model_dir(config, layout.models_dir)
    dtype = device.compute_dtype(config.mixed_precision)

    def load_encoder():  # only when a text needs encoding
        log(f"loading T5 text encoder ({config.text_encoder_precision}) from {model_dir}")
        if config.text_encoder_precision == "int8-quanto":
            encoder = quantized_text_encoder(model_dir, layout, dtype, device.torch_device, log)
        else:
            encoder = models.load_text_encoder(model_dir, dtype)
        return models.load_tokenizer(model_dir), encoder.to(device.torch_device).eval()

    identity = combine_hashes(
        models.component_identity(model_dir, "text_encoder"), models.component_identity(model_dir, "tokenizer"),
        config.text_encoder_precision, quanto_version() if config.text_encoder_precision != "no_change" else "",
    )
    previous_entries = read_embedding_index(layout.embedding_index) if layout.embedding_index.is_file() else []
    previous = {e.cache_key for e in previous_entries}
    entries, stats = encode_texts(
        texts_to_encode(config, rows), layout.embedding_dir, load_encoder,
        width=models.text_width(model_dir), encoder_identity=identity,
        max_length=config.tokenizer_max_length, padding=config.flux_t5_padding,
        device=device.torch_device, dtype=dtype, log=log,
        known_tokens={e.cache_key: e.tokens for e in previous_entries if e.tokens is not None},
        known_finite={e.cache_key: e.finite for e in previous_entries if e.finite is not None},
        load_tokenizer=lambda: models.load_tokenizer(model_dir),
    )
    if stats["encoded"]:
        # The encoder was freed when encode_texts returned (it is in no reference cycle, so no gc.collect,
        # which took 0.3 s per run); the GPU allocator's cache still holds its memory until emptied.
        device.empty_cache()
    if entries != previous_entries:  # an unchanged index is not rewritten: a no-op re-run writes nothing
        write_embedding_index(entries, layout.embedding_index)
    current = {e.cache_key for e in entries}
    stats.update(distinct_texts=len(current), dropped=len(previous - current))
    encoded_keys = stats.pop("encoded_keys")
    over_long = over_long_texts(entries, config.tokenizer_max_length)
    if over_long:
        warn(over_long_message(over_long, config.tokenizer_max_length))
    stats["over_long"] = over_long
    if config.named_datasets:
        per_dataset = defaultdict(lambda: {"captions": 0, "encoded": 0})
        keys = {e.path: e.cache_key for e in entries if e.role == "caption"}
        for row in rows:
            per_dataset[row.dataset]["captions"] += 1
            per_dataset[row.dataset]["encoded"] += keys[row.path] in encoded_keys
        stats["datasets"] = dict(sorted(per_dataset.items()))
    return StepResult(embeddings_version(entries), layout.embedding_index, stats)


def quantized_text_encoder(model_dir, layout: Layout, dtype, device, log=print):
    """T5 in int8, quantized once and saved under models/, then reloaded from there like the base model:
    T5-XXL is read as 4.8 GB of int8 instead of 9.5 GB of bf16 quantized again at every caption edit."""
    key = combine_hashes(models.component_identity(model_dir, "text_encoder"), "int8-quanto", str(dtype),
                         quanto_version())
    folder = layout.quantized_text_encoder_dir(key[:24])
    if is_complete(folder):
        log(f"reading the int8 text encoder quantized before, from {folder}")
        return load_quantized_module(models.text_encoder_skeleton(folder), folder, dtype, str(device))
    encoder = quantize_model(models.load_text_encoder(model_dir, dtype), "int8-quanto", keep=())
    save_quantized_module(encoder, folder, {"precision": "int8-quanto", "dtype": str(dtype),
                                            "source": str(Path(model_dir) / "text_encoder"),
                                            "optimum_quanto": quanto_version()})
    log(f"quantized the text encoder to int8 and saved it to {folder}; later edits read it from there")
    return encoder


def embeddings_version(entries) -> str:
    """What training reads from this cache: each file's caption embedding and the empty one.

    Validation prompts are left out on purpose: a new prompt re-renders the grid (its own
    code version says so) but must not make the adapter look out of date.
    """
    return combine_hashes(*sorted(f"{e.role}:{e.path}:{e.cache_key}" for e in entries if e.role in ("caption", "empty")))


def cached_prompts(config: ChromaConfig, layout: Layout):
    """The validation prompts and the negative prompt from the text cache, for rendering without T5.

    Returns (prompts, {prompt: (prompt_embeds, attention_mask)}, (negative embeds, mask), cache keys).
    """
    texts = {(e.role, e.text): e.cache_key for e in read_embedding_index(layout.embedding_index)}
    width = models.text_width(models.resolve_model_dir(config, layout.models_dir))
    keys = []

    def cached(role: str, text: str):
        if (role, text) not in texts:
            raise RuntimeError(f"the {role} prompt {text!r} has no cached embedding: re-materialize text_embeddings")
        keys.append(texts[(role, text)])
        entry = load_embedding(layout.embedding_dir, texts[(role, text)], config.tokenizer_max_length, width)
        if entry is None:
            raise RuntimeError(f"the {role} prompt {text!r}: cached embedding missing or corrupt; re-materialize text_embeddings")
        return entry["prompt_embeds"], entry["attention_mask"]

    prompts = config.validation_prompts
    embeddings = {prompt: cached("validation", prompt) for prompt in prompts}
    negative = cached("negative", config.validation_negative_prompt)
    return prompts, embeddings, negative, keys
