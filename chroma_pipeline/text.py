"""T5 prompt embeddings with Chroma's mask rule, cached per distinct text.

Chroma differs from Flux in two ways here (see ChromaPipeline._get_t5_prompt_embeds):
the tokenizer's padding mask goes into T5, and the transformer attends to the real
tokens plus exactly one padding token. That second mask is stored with every
embedding, so training and sampling never rebuild it differently.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import torch

from .storage import combine_hashes, load_tensors_checked, read_rows, save_tensors_atomic, sha256_text, write_rows_atomic


@dataclass
class EmbeddingEntry:
    text_sha256: str
    role: str  # "caption", "empty", "validation" or "negative"
    cache_key: str
    text: str
    path: str = ""  # for captions: the image file the caption belongs to
    # The text's tokens before truncation (T5's closing </s> included): more than max_length means
    # the embedding saw only the first max_length. Counted once, then kept with the index row.
    tokens: int | None = None
    # Whether every value is finite, seen when it was encoded (None: not known yet), and whether
    # the run that wrote this index encoded it (the checks read those back). A re-run trusts an
    # entry from its file's header and these, reading no tensor.
    finite: bool | None = None
    fresh: bool = False
    stored_positions: int | None = None  # the open positions its file holds, as its header said


def chroma_attention_mask(tokenizer_mask: torch.Tensor) -> torch.Tensor:
    """Keep the real tokens and the first padding token: position i is open when i <= number of real tokens."""
    lengths = tokenizer_mask.sum(dim=-1, keepdim=True)
    positions = torch.arange(tokenizer_mask.shape[-1], device=tokenizer_mask.device)
    return (positions <= lengths).to(torch.int64)


def embedding_cache_key(text_sha256: str, encoder_identity: str, dtype: torch.dtype, max_length: int, padding: str) -> str:
    return combine_hashes(text_sha256, encoder_identity, str(dtype), str(max_length), padding)


def entry_file(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / key[:2] / f"{key}.safetensors"


@torch.no_grad()
def encode_prompts(texts, tokenizer, text_encoder, max_length: int, padding: str, device: str, dtype: torch.dtype):
    """Returns (prompt_embeds [B, L, D], attention_mask [B, L]) following the Chroma rule."""
    tokens = tokenizer(
        list(texts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    )
    tokenizer_mask = tokens.attention_mask.to(device)
    prompt_embeds = text_encoder(tokens.input_ids.to(device), attention_mask=tokenizer_mask)[0].to(dtype)
    attention_mask = chroma_attention_mask(tokenizer_mask)
    if padding == "zero":
        # Positions the transformer never attends to are zeroed, so the cache holds no noise.
        prompt_embeds = prompt_embeds * attention_mask.unsqueeze(-1).to(dtype)
    return prompt_embeds, attention_mask


def count_tokens(tokenizer, texts: list[str]) -> list[int]:
    """Each text's token count before truncation, so a caption cut to `tokenizer_max_length` can be named."""
    # verbose=False: the count is the point here, not transformers' "longer than the maximum" warning.
    return [len(ids) for ids in tokenizer(list(texts), truncation=False, verbose=False)["input_ids"]]


def _is_valid(max_length: int, width: int):
    def check(tensors) -> bool:
        embeds, mask = tensors.get("prompt_embeds"), tensors.get("attention_mask")
        if embeds is None or mask is None or tuple(mask.shape) != (max_length,):
            return False
        open_positions = int(mask.sum())
        return (
            tuple(embeds.shape) == (open_positions, width)
            and bool(mask[:open_positions].all())  # open positions form a prefix, as the Chroma rule makes them
            and bool(torch.isfinite(embeds).all())
        )

    return check


def load_embedding(cache_dir: Path, key: str, max_length: int, width: int) -> dict[str, torch.Tensor] | None:
    """The cached (prompt_embeds [max_length, width], attention_mask [max_length]), or None if missing or bad.

    Only the open positions are stored; the closed ones come back as zeros. The transformer
    never reads them (the mask closes them), so its input is what encoding on the fly gives.
    """
    tensors = load_tensors_checked(entry_file(cache_dir, key), _is_valid(max_length, width))
    if tensors is None:
        return None
    embeds = tensors["prompt_embeds"]
    padded = torch.zeros(max_length, width, dtype=embeds.dtype)
    padded[: embeds.shape[0]] = embeds
    return {"prompt_embeds": padded, "attention_mask": tensors["attention_mask"].long()}


def embedding_open_positions(cache_dir: Path, key: str, max_length: int, width: int) -> int | None:
    """How many positions an entry stores (its open ones), from the file's header alone; None if absent or misshapen.

    safetensors refuses to open a file shorter than its header says, so a truncated entry is absent.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(entry_file(cache_dir, key)), framework="pt") as handle:
            embeds, mask = handle.get_slice("prompt_embeds").get_shape(), handle.get_slice("attention_mask").get_shape()
    except Exception:  # missing, truncated, foreign
        return None
    if tuple(mask) != (max_length,) or len(embeds) != 2 or embeds[1] != width or not 0 < embeds[0] <= max_length:
        return None
    return embeds[0]


def save_embedding(cache_dir: Path, key: str, prompt_embeds: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """Write one entry with only its open positions; returns the bytes on disk."""
    open_positions = int(attention_mask.sum())
    path = entry_file(cache_dir, key)
    save_tensors_atomic(path, {"prompt_embeds": prompt_embeds[:open_positions], "attention_mask": attention_mask.bool()})
    return path.stat().st_size


def encode_texts(
    texts_by_role: list[tuple[str, str, str]],
    cache_dir: Path,
    load_encoder,
    width: int,
    encoder_identity: str,
    max_length: int,
    padding: str,
    device: str,
    dtype: torch.dtype,
    batch_size: int = 8,
    log=print,
    known_tokens: dict[str, int] | None = None,
    load_tokenizer=None,
    known_finite: dict[str, bool] | None = None,
) -> tuple[list[EmbeddingEntry], dict[str, int]]:
    """Cache an embedding for every distinct text; `texts_by_role` holds (role, text, path) triples.

    `load_encoder` returns (tokenizer, text_encoder) and is called only if something is missing;
    the encoder is released when this returns. Every entry gets its token count: counted while
    encoding, else taken from `known_tokens` (cache key -> count, from the previous index), else
    counted with `load_tokenizer()` alone, so a fully cached run never loads T5 to count. A
    cached entry is trusted from its file's header and `known_finite` (cache key -> finite, from
    the previous index); its tensors are read only when that flag is unknown.
    """
    entries: dict[tuple[str, str, str], EmbeddingEntry] = {}
    for role, text, path in texts_by_role:
        text_hash = sha256_text(text)
        key = embedding_cache_key(text_hash, encoder_identity, dtype, max_length, padding)
        entries.setdefault((role, text_hash, path), EmbeddingEntry(text_hash, role, key, text, path))

    distinct = {e.cache_key: e.text for e in entries.values()}
    finite = {key: flag for key, flag in (known_finite or {}).items() if key in distinct}
    # An entry that was NaN when encoded is encoded again (an fp16 overflow may not recur).
    stored = {key: embedding_open_positions(cache_dir, key, max_length, width) for key in distinct}
    missing = [(key, text) for key, text in distinct.items() if finite.get(key) is False or stored[key] is None]
    missing_keys = {key for key, _ in missing}
    for key in distinct.keys() - missing_keys - finite.keys():  # cached before the flag was kept: read once
        finite[key] = load_embedding(cache_dir, key, max_length, width) is not None
    if missing:  # after a crash this says how much of the killed run survived (each entry is its own file)
        log(f"{len(distinct) - len(missing)} of {len(distinct)} texts have cached embeddings; encoding {len(missing)}")
    tokenizer, text_encoder = load_encoder() if missing else (None, None)
    tokens = {key: count for key, count in (known_tokens or {}).items() if key in distinct}
    started = time.perf_counter()
    for start in range(0, len(missing), batch_size):
        batch = missing[start : start + batch_size]
        prompt_embeds, attention_mask = encode_prompts(
            [text for _, text in batch], tokenizer, text_encoder, max_length, padding, device, dtype
        )
        tokens.update(zip([key for key, _ in batch], count_tokens(tokenizer, [text for _, text in batch]), strict=True))
        for i, (key, _text) in enumerate(batch):
            save_embedding(cache_dir, key, prompt_embeds[i], attention_mask[i])
            stored[key] = int(attention_mask[i].sum())
            finite[key] = bool(torch.isfinite(prompt_embeds[i][: stored[key]]).all())
        done = min(start + batch_size, len(missing))
        if done == len(missing) or (start // batch_size) % 25 == 0:
            rate = done / max(time.perf_counter() - started, 1e-9)
            log(f"encoded {done}/{len(missing)} texts, {rate:.1f} texts/s, ETA {(len(missing) - done) / rate:.0f}s")

    uncounted = [key for key in distinct if key not in tokens]
    if uncounted:  # cached before counts were kept: the tokenizer alone counts them
        counter = tokenizer or load_tokenizer()
        tokens.update(zip(uncounted, count_tokens(counter, [distinct[key] for key in uncounted]), strict=True))
    for entry in entries.values():
        entry.tokens, entry.finite = tokens[entry.cache_key], finite[entry.cache_key]
        entry.stored_positions = stored[entry.cache_key]
        entry.fresh = entry.cache_key in missing_keys

    bytes_on_disk = sum(entry_file(cache_dir, key).stat().st_size for key in distinct)
    itemsize = torch.empty((), dtype=dtype).element_size()
    bytes_unpruned = len(distinct) * (max_length * width * itemsize + max_length)
    stats = {
        "encoded": len(missing), "reused": len(distinct) - len(missing),
        "bytes_on_disk": bytes_on_disk, "bytes_unpruned": bytes_unpruned, "encoded_keys": missing_keys,
    }
    return list(entries.values()), stats


def write_embedding_index(entries: list[EmbeddingEntry], path: Path) -> None:
    write_rows_atomic(entries, _INDEX_SCHEMA, path)


def read_embedding_index(path: Path) -> list[EmbeddingEntry]:
    return read_rows(path, EmbeddingEntry, "text_embeddings")


_INDEX_SCHEMA = pa.schema(
    [
        ("text_sha256", pa.string()), ("role", pa.string()), ("cache_key", pa.string()), ("text", pa.string()),
        ("path", pa.string()), ("tokens", pa.int32()), ("finite", pa.bool_()), ("fresh", pa.bool_()),
        ("stored_positions", pa.int32()),
    ]
)
