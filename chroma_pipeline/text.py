"""T5 prompt embeddings with Chroma's mask rule, cached per distinct text.

Chroma differs from Flux in two ways here (see ChromaPipeline._get_t5_prompt_embeds):
the tokenizer's padding mask goes into T5, and the transformer attends to the real
tokens plus exactly one padding token. That second mask is stored with every
embedding, so training and sampling never rebuild it differently.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .storage import atomic_path, combine_hashes, load_tensors_checked, save_tensors_atomic, sha256_text


@dataclass
class EmbeddingEntry:
    text_sha256: str
    role: str  # "caption", "empty", "validation" or "negative"
    cache_key: str
    text: str


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


def _is_valid(max_length: int, width: int):
    def check(tensors) -> bool:
        embeds, mask = tensors.get("prompt_embeds"), tensors.get("attention_mask")
        return (
            embeds is not None and mask is not None
            and tuple(embeds.shape) == (max_length, width) and tuple(mask.shape) == (max_length,)
            and bool(torch.isfinite(embeds).all())
        )

    return check


def load_embedding(cache_dir: Path, key: str, max_length: int, width: int) -> dict[str, torch.Tensor] | None:
    return load_tensors_checked(entry_file(cache_dir, key), _is_valid(max_length, width))


def encode_texts(
    texts_by_role: list[tuple[str, str]],
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
) -> tuple[list[EmbeddingEntry], dict[str, int]]:
    """Cache an embedding for every distinct text; `texts_by_role` holds (role, text) pairs.

    `load_encoder` returns (tokenizer, text_encoder) and is called only if something is missing.
    """
    entries: dict[tuple[str, str], EmbeddingEntry] = {}
    for role, text in texts_by_role:
        text_hash = sha256_text(text)
        key = embedding_cache_key(text_hash, encoder_identity, dtype, max_length, padding)
        entries.setdefault((text_hash, role), EmbeddingEntry(text_hash, role, key, text))

    distinct = {e.cache_key: e.text for e in entries.values()}
    missing = [(key, text) for key, text in distinct.items() if load_embedding(cache_dir, key, max_length, width) is None]
    tokenizer, text_encoder = load_encoder() if missing else (None, None)
    for start in range(0, len(missing), batch_size):
        batch = missing[start : start + batch_size]
        prompt_embeds, attention_mask = encode_prompts(
            [text for _, text in batch], tokenizer, text_encoder, max_length, padding, device, dtype
        )
        for i, (key, _text) in enumerate(batch):
            save_tensors_atomic(
                entry_file(cache_dir, key), {"prompt_embeds": prompt_embeds[i], "attention_mask": attention_mask[i]}
            )
        log(f"encoded {min(start + batch_size, len(missing))}/{len(missing)} texts")
    return list(entries.values()), {"encoded": len(missing), "reused": len(distinct) - len(missing)}


def write_embedding_index(entries: list[EmbeddingEntry], path: Path) -> None:
    table = pa.Table.from_pylist([asdict(e) for e in entries], schema=_INDEX_SCHEMA)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_embedding_index(path: Path) -> list[EmbeddingEntry]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"no embedding index at {path}: materialize text_embeddings first")
    return [EmbeddingEntry(**row) for row in pq.read_table(path).to_pylist()]


_INDEX_SCHEMA = pa.schema(
    [("text_sha256", pa.string()), ("role", pa.string()), ("cache_key", pa.string()), ("text", pa.string())]
)
