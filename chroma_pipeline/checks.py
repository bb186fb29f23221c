"""What must hold before the next step may use an artifact. Dagster shows these as asset checks.

Each check returns a `CheckOutcome`: passed or not, one sentence saying why, and the
offending items, so a failed check in the UI names the file or prompt to look at.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import models
from .config import ChromaConfig
from .dataset import read_manifest, usable
from .device import DeviceInfo
from .flow import image_position_ids, pack_latents, predict_velocity
from .latents import load_latent_entry, read_latent_index
from .layout import Layout
from .lora import apply_adapter
from .quantized_base import decided_precision, load_base_transformer, quantized_key
from .shards import ShardStore
from .storage import write_json_atomic
from .text import count_tokens, embedding_open_positions, load_embedding, read_embedding_index
from .text_embeddings import over_long_message, over_long_texts


@dataclass
class CheckOutcome:
    passed: bool
    description: str
    problems: list[str] = field(default_factory=list)  # at most a screenful: "file: what is wrong"
    counts: dict[str, float] = field(default_factory=dict)


def remembered(path: Path, compute) -> CheckOutcome:
    """A check of an immutable artifact (keyed by content) is computed once; a re-run reads the answer."""
    if path.is_file():
        saved = json.loads(path.read_text())
        saved["description"] += " (checked before for this exact artifact)"
        return CheckOutcome(**saved)
    outcome = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, asdict(outcome))
    return outcome


def _outcome(problems: list[str], ok: str, bad: str, counts: dict) -> CheckOutcome:
    if problems:
        return CheckOutcome(False, bad.format(n=len(problems), first=problems[0]), problems[:50], counts)
    return CheckOutcome(True, ok, [], counts)


def latents_complete_and_finite(config: ChromaConfig, layout: Layout) -> CheckOutcome:
    """Every usable image of the scan has a cached latent of its bucket's shape with finite values.

    What the last run encoded is read back; the rest is trusted from the index the step wrote
    after finding each entry in its shard's header, with the finiteness seen when it was encoded
    (`deep_cache_checks: true` reads every tensor instead).
    """
    channels = models.vae_config(models.resolve_model_dir(config, layout.models_dir))["latent_channels"]
    scanned = {row.path: row.image_sha256 for row in usable(read_manifest(layout.manifest))}
    entries = {entry.path: entry for entry in read_latent_index(layout.latent_index)}
    store = ShardStore(layout.latent_dir)
    problems, read_back = [], 0
    for path, sha in sorted(scanned.items()):
        entry = entries.get(path)
        if entry is None or entry.image_sha256 != sha:
            problems.append(f"{path}: no latent for the scanned image")
        elif entry.fresh or entry.finite is None or config.deep_cache_checks:
            read_back += 1
            if load_latent_entry(store, entry, channels) is None:
                problems.append(f"{path}: latent missing, wrong shape or not finite (NaN/inf)")
        elif not entry.finite:  # the step found it in its shard's header, of its shape, when it wrote the index
            problems.append(f"{path}: latent not finite (NaN/inf)")
    return _outcome(
        problems, f"all {len(scanned)} usable images have finite latents ({read_back} read back, the others "
        "trusted from the index the step wrote after checking their shard headers)",
        "{n} usable images have no usable latent, first: {first}. Re-materialize image_latents; if it persists, "
        "the VAE produces NaN at this precision (try mixed_precision 'no' or 'bf16').",
        {"usable images": len(scanned), "bad latents": len(problems), "read back": read_back},
    )


def embeddings_follow_mask_rule(config: ChromaConfig, layout: Layout) -> CheckOutcome:
    """Every cached embedding has its mask: the text's tokens plus exactly one padding token open, finite values.

    What the last run encoded is read back, and its text tokenized again to count its real
    tokens independently (a text that fills `tokenizer_max_length` has no padding left to open).
    The rest is checked from the index the step wrote: the open positions each file's header
    showed (a file stores exactly those) against the token count, and the finiteness seen at
    encoding; `deep_cache_checks: true` reads them all.
    """
    model_dir = models.resolve_model_dir(config, layout.models_dir)
    width = models.text_width(model_dir)
    max_length = config.tokenizer_max_length
    problems, truncated, read_back, tokenizer = [], 0, 0, None
    entries = read_embedding_index(layout.embedding_index)
    for entry in entries:
        name = entry.path or f"{entry.role} prompt {entry.text[:40]!r}"
        if entry.fresh or entry.finite is None or entry.tokens is None or config.deep_cache_checks:
            read_back += 1
            cached = load_embedding(layout.embedding_dir, entry.cache_key, max_length, width)
            if cached is None:  # the reader refuses a truncated file, a wrong shape and NaN/inf alike
                problems.append(f"{name}: embedding missing, corrupt or not finite (NaN/inf)")
                continue
            tokenizer = tokenizer or models.load_tokenizer(model_dir)
            tokens = len(tokenizer(entry.text, max_length=max_length, truncation=True)["input_ids"])
            opened = int(cached["attention_mask"].sum())
        else:  # the step read these from the file's header when it wrote the index
            opened = entry.stored_positions
            if opened is None:  # an index from before the count was kept
                opened = embedding_open_positions(layout.embedding_dir, entry.cache_key, max_length, width)
            if opened is None or not entry.finite:
                problems.append(f"{name}: embedding missing, corrupt or not finite (NaN/inf)")
                continue
            tokens = min(entry.tokens, max_length)
        expected = min(tokens + 1, max_length)
        truncated += tokens >= max_length
        if opened != expected:
            problems.append(f"{name}: {opened} open mask positions, expected {tokens} tokens + 1 padding = {expected}")
    return _outcome(
        problems, f"all {len(entries)} embeddings keep their tokens plus one padding token ({read_back} read back, "
        "the others checked from the counts the step kept in the index)",
        "{n} embeddings break the Chroma mask rule, first: {first}. Re-materialize text_embeddings.",
        {"embeddings": len(entries), "bad embeddings": len(problems), "truncated texts": truncated,
         "read back": read_back},
    )


def captions_fit_tokenizer_max_length(config: ChromaConfig, layout: Layout) -> CheckOutcome:
    """No caption or prompt is longer than `tokenizer_max_length` tokens: a longer one was cut, T5 never saw its end.

    The counts come from the embedding index, where encoding left them; an index written
    before counts were kept is counted with the tokenizer (T5 is not loaded).
    """
    max_length = config.tokenizer_max_length
    entries = read_embedding_index(layout.embedding_index)
    uncounted = [entry for entry in entries if entry.tokens is None]
    if uncounted:
        tokenizer = models.load_tokenizer(models.resolve_model_dir(config, layout.models_dir))
        for entry, tokens in zip(uncounted, count_tokens(tokenizer, [entry.text for entry in uncounted]), strict=True):
            entry.tokens = tokens
    over_long = over_long_texts(entries, max_length)
    counts = {"texts": len(entries), "texts over tokenizer_max_length": len(over_long),
              "most tokens": max((entry.tokens for entry in entries), default=0)}
    if not over_long:
        return CheckOutcome(True, f"all {len(entries)} texts fit in tokenizer_max_length ({max_length} tokens)", [], counts)
    problems = [f"{name}: {tokens} tokens, cut to {max_length}" for name, tokens in over_long]
    return CheckOutcome(False, over_long_message(over_long, max_length), problems[:50], counts)


def _probe_inputs(transformer, dtype, device):
    """A fixed small input: one 64x64 image's tokens, eight text tokens, sigma 0.5."""
    generator = torch.Generator().manual_seed(0)
    channels = transformer.config.in_channels // 4
    latents = torch.randn(1, channels, 8, 8, generator=generator)
    text_width = transformer.config.joint_attention_dim
    prompt_embeds = torch.randn(1, 8, text_width, generator=generator)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]])
    return dict(
        noisy_tokens=pack_latents(latents).to(device, dtype), sigmas=torch.tensor([0.5], device=device),
        prompt_embeds=prompt_embeds.to(device, dtype), text_mask=mask.to(device), image_ids=image_position_ids(8, 8),
    )


@torch.no_grad()
def probe_output(transformer, device: DeviceInfo, dtype) -> torch.Tensor:
    return predict_velocity(transformer, **_probe_inputs(transformer, dtype, device.torch_device)).float().cpu()


def quantized_forward_is_finite(config: ChromaConfig, layout: Layout, device: DeviceInfo) -> CheckOutcome:
    """The saved base model, reloaded as training will reload it, gives a finite prediction."""
    model_dir = models.resolve_model_dir(config, layout.models_dir)
    precision, _reason = decided_precision(config, layout, model_dir, device)
    key = quantized_key(config, model_dir, device, precision)
    return remembered(layout.checks_dir / f"forward-{key}.json",
                      lambda: _forward_is_finite(config, layout, device, precision))


def _forward_is_finite(config: ChromaConfig, layout: Layout, device: DeviceInfo, precision: str) -> CheckOutcome:
    transformer = load_base_transformer(config, layout, device, precision)
    output = probe_output(transformer, device, device.compute_dtype(config.mixed_precision))
    del transformer
    device.empty_cache()
    finite = bool(torch.isfinite(output).all())
    counts = {"output mean abs": float(output.nan_to_num().abs().mean())}
    if finite:
        return CheckOutcome(True, f"the reloaded {precision} transformer predicts finite values", [], counts)
    return CheckOutcome(
        False,
        f"the reloaded {precision} transformer predicts NaN/inf: training on it would diverge. "
        "Try another base_model_precision (int8-quanto is the safest) or mixed_precision 'bf16'.",
        ["forward pass on a fixed probe input"], counts,
    )


def adapter_changes_output(config: ChromaConfig, layout: Layout, device: DeviceInfo, adapter: Path) -> CheckOutcome:
    """diffusers' LoRA loader applies every key of the adapter, and the prediction moves."""
    # The adapter's folder is named by its key: same folder, same adapter.
    return remembered(layout.checks_dir / f"adapter-{adapter.parent.name}.json",
                      lambda: _adapter_changes_output(config, layout, device, adapter))


def _adapter_changes_output(config: ChromaConfig, layout: Layout, device: DeviceInfo, adapter: Path) -> CheckOutcome:
    from safetensors import safe_open

    with safe_open(adapter, "pt") as file:
        in_file = sum(1 for key in file.keys() if ".lora_A." in key)
    dtype = device.compute_dtype(config.mixed_precision)
    transformer = load_base_transformer(config, layout, device)
    before = probe_output(transformer, device, dtype)
    apply_adapter(transformer, adapter, "check")
    after = probe_output(transformer, device, dtype)
    applied = sum(1 for module in transformer.modules() if "check" in getattr(module, "lora_A", {}))
    del transformer
    device.empty_cache()
    change = float((after - before).abs().max())
    counts = {"max output change": change, "LoRA modules in file": in_file, "LoRA modules applied": applied}
    if applied != in_file:
        return CheckOutcome(
            False, f"diffusers applied {applied} of the {in_file} LoRA modules in {adapter.name}: the other keys "
            "match no layer of this transformer", [str(adapter)], counts,
        )
    if not torch.isfinite(after).all():
        return CheckOutcome(False, f"{adapter.name} makes the prediction NaN/inf", [str(adapter)], counts)
    if change == 0.0:
        return CheckOutcome(
            False, f"{adapter.name} loads but does not change the transformer's output (its keys match no layer, "
            "or training left it at zero)", [str(adapter)], counts,
        )
    return CheckOutcome(True, f"{adapter.name} loads with diffusers and changes the output by up to {change:.3g}", [], counts)


def grid_not_blank(grid_dir: Path) -> CheckOutcome:
    """No validation image is flat, black or NaN."""
    summary = json.loads((grid_dir / "grid.json").read_text())
    problems = summary.get("blank_cells", [])
    return _outcome(
        problems, f"all {summary['cells']} validation images have content",
        "{n} validation images are blank, black or NaN, first: {first}",
        {"images": summary["cells"], "blank images": len(problems)},
    )
