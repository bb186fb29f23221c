"""Which transformer layers get LoRA (`flux_lora_target`), and saving the adapter.

Presets name diffusers modules of ChromaTransformer2DModel. They are turned into one
anchored regex so `proj_out` of a single block never also matches the model's final
`proj_out`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

IMAGE_ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
TEXT_ATTENTION = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
IMAGE_FFS = ("ff.net.0.proj", "ff.net.2")
TEXT_FFS = ("ff_context.net.0.proj", "ff_context.net.2")
SINGLE_ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v")
SINGLE_FFS = ("proj_mlp", "proj_out")


def _pattern(double: tuple[str, ...], single: tuple[str, ...], single_indices: str = r"\d+") -> str:
    parts = []
    if double:
        parts.append(rf"transformer_blocks\.\d+\.({'|'.join(map(_escape, double))})")
    if single:
        parts.append(rf"single_transformer_blocks\.({single_indices})\.({'|'.join(map(_escape, single))})")
    return "^(" + "|".join(parts) + ")$"


def _escape(name: str) -> str:
    return name.replace(".", r"\.")


def _with_embedder(pattern: str) -> str:
    return pattern[:-2] + "|x_embedder)$"


def target_modules(preset: str | list[str], num_single_layers: int) -> str:
    """A peft `target_modules` regex for a `flux_lora_target` preset, or for an explicit list of module names.

    A list names diffusers modules as PEFT matches them: a full name (`transformer_blocks.0.attn.to_q`)
    or the end of one (`attn.to_q`, `to_q`, `proj_mlp`), which then applies to every module it ends.
    """
    if isinstance(preset, list):  # PEFT's rule, as SimpleTuner passes them: a name matches itself and any suffix
        return rf"^(.*\.)?({'|'.join(map(_escape, preset))})$"
    # SimpleTuner's Chroma presets (helpers/models/chroma/model.py), as the modules they reach here.
    if preset == "all":
        return _pattern(IMAGE_ATTENTION + TEXT_ATTENTION, SINGLE_ATTENTION)
    if preset in ("all+ffs", "ai-toolkit"):  # ai-toolkit's norm*.linear: Chroma's norms have no linear
        return _pattern(IMAGE_ATTENTION + TEXT_ATTENTION + IMAGE_FFS + TEXT_FFS, SINGLE_ATTENTION + SINGLE_FFS)
    if preset == "all+ffs+embedder":
        return _with_embedder(target_modules("all+ffs", num_single_layers))
    if preset == "context":
        return _pattern(TEXT_ATTENTION, ())
    if preset == "context+ffs":
        return _pattern(TEXT_ATTENTION + TEXT_FFS, ())
    if preset == "tiny":
        return _pattern(IMAGE_ATTENTION + IMAGE_FFS[:1], SINGLE_ATTENTION)
    if preset == "tiny+embedder":
        return _with_embedder(target_modules("tiny", num_single_layers))
    if preset == "nano":
        # SimpleTuner's Chroma code has no `nano`: it trains its default targets, q, k, v and out.
        return _pattern(IMAGE_ATTENTION, SINGLE_ATTENTION)
    raise ValueError(f"unknown flux_lora_target {preset!r}")


def lora_config(rank: int, alpha: float, preset: str | list[str], num_single_layers: int, dropout: float = 0.0):
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        init_lora_weights="gaussian",
        target_modules=target_modules(preset, num_single_layers),
    )


def apply_adapter(transformer, path: Path, adapter_name: str) -> None:
    """Load a LoRA file (ours, kohya/ComfyUI, ...) onto `transformer`, the way ChromaPipeline.load_lora_weights does.

    The pipeline's own method looks up `<layer>.weight` to reshape Flux LoRAs and raises
    KeyError on a quanto model (its weights are `weight._data`); its two halves work on any
    model: the classmethod reads and converts the file (alpha tensors included), the
    transformer applies it.
    """
    from diffusers import ChromaPipeline

    state, alphas, metadata = ChromaPipeline.lora_state_dict(str(path), return_alphas=True, return_lora_metadata=True)
    transformer.load_lora_adapter(state, network_alphas=alphas or None, metadata=metadata or None,
                                  prefix="transformer", adapter_name=adapter_name)


def load_initial_adapter(transformer, path: Path) -> int:
    """Start from an existing diffusers-format LoRA (`init_lora`): its A and B replace the fresh ones.

    Returns how many tensors were loaded; every LoRA tensor of the model must be in the file
    with the same shape, so a rank or target mismatch is an error, not a silent partial start.
    """
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file

    loaded = {k.removeprefix("transformer."): v for k, v in load_file(str(path)).items() if k.startswith("transformer.")}
    expected = get_peft_model_state_dict(transformer)
    # The strength it was trained at: alpha tensors, else the header's config, else alpha = rank.
    with safe_open(str(path), "pt") as handle:
        header = json.loads((handle.metadata() or {}).get("lora_adapter_metadata", "{}"))
    rank = next(v.shape[0] for k, v in loaded.items() if k.endswith("lora_A.weight")) if loaded else 1
    alphas = [float(v) for k, v in loaded.items() if k.endswith(".alpha")]
    file_alpha = alphas[0] if alphas else float(header.get("transformer.lora_alpha", header.get("transformer.r", rank)))
    ours = transformer.peft_config["default"]
    rescale = (file_alpha / rank) / (ours.lora_alpha / ours.r)  # keep the file's effective B @ A * scale
    missing = sorted(expected.keys() - loaded.keys())
    wrong = sorted(k for k in expected.keys() & loaded.keys() if expected[k].shape != loaded[k].shape)
    if missing or wrong or not loaded:
        raise ValueError(
            f"init_lora {path} does not fit this LoRA (network_rank, flux_lora_target): "
            f"{len(missing)} tensors missing (e.g. {missing[:2]}), {len(wrong)} with another shape (e.g. {wrong[:2]})"
        )
    start = {k: loaded[k] * rescale if "lora_B" in k else loaded[k] for k in expected}
    set_peft_model_state_dict(transformer, start)
    return len(expected)


# diffusers module (after the block index) -> original (BFL) module, for the kohya / ComfyUI layout.
# Fused BFL modules take several diffusers modules stacked along the output dimension, in this order.
DOUBLE_FUSED = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
DOUBLE_PLAIN = {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0",
                "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}
SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
SINGLE_PLAIN = {"proj_out": "linear2"}
TOP_PLAIN = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear"}


def kohya_layout(state: dict[str, torch.Tensor], transformer, alpha: float) -> dict[str, torch.Tensor]:
    """The adapter with BFL module names under `lora_unet_`, `lora_down`/`lora_up` and an `alpha` per module.

    A fused module gets down = the parts' A stacked, up = their B placed block-diagonally (zero
    rows for a part that has no LoRA), and alpha scaled by the number of parts: loaders scale by
    alpha / rows-of-down, so each part keeps the trained alpha / rank. Every part's delta is
    then exactly its B @ A * alpha / rank.
    """
    rank = next(v for k, v in state.items() if k.endswith("lora_A.weight")).shape[0]
    out: dict[str, torch.Tensor] = {}

    def module(block: str, name: str):
        return transformer.get_submodule(f"{block}.{name}")

    def emit(key: str, down: torch.Tensor, up: torch.Tensor, parts: int) -> None:
        out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = down.contiguous(), up.contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(alpha * parts))

    groups = [(f"transformer_blocks.{i}", f"lora_unet_double_blocks_{i}", DOUBLE_FUSED, DOUBLE_PLAIN)
              for i in range(len(transformer.transformer_blocks))]
    groups += [(f"single_transformer_blocks.{i}", f"lora_unet_single_blocks_{i}", SINGLE_FUSED, SINGLE_PLAIN)
               for i in range(len(transformer.single_transformer_blocks))]
    for block, kohya, fused, plain in groups:
        for bfl, parts in fused.items():
            present = [p for p in parts if f"{block}.{p}.lora_A.weight" in state]
            if not present:
                continue
            downs = [state[f"{block}.{p}.lora_A.weight"] for p in present]
            sizes = [module(block, p).out_features for p in parts]
            up = torch.zeros(sum(sizes), rank * len(present))
            row = 0
            for part, size in zip(parts, sizes, strict=True):
                if part in present:
                    column = present.index(part) * rank
                    up[row : row + size, column : column + rank] = state[f"{block}.{part}.lora_B.weight"]
                row += size
            emit(f"{kohya}_{bfl.replace('.', '_')}", torch.cat(downs), up, len(present))
        for ours, bfl in plain.items():
            if f"{block}.{ours}.lora_A.weight" in state:
                emit(f"{kohya}_{bfl.replace('.', '_')}", state[f"{block}.{ours}.lora_A.weight"],
                     state[f"{block}.{ours}.lora_B.weight"], 1)
    for ours, bfl in TOP_PLAIN.items():
        if f"{ours}.lora_A.weight" in state:
            emit(f"lora_unet_{bfl.replace('.', '_')}", state[f"{ours}.lora_A.weight"], state[f"{ours}.lora_B.weight"], 1)
    exported = {k for k in state if k.startswith(("transformer_blocks.", "single_transformer_blocks."))
                or k.split(".")[0] in TOP_PLAIN}
    if len(exported) != len(state):
        raise ValueError(f"no kohya name for {sorted(set(state) - exported)[:3]}")
    return out


def save_adapter(transformer, folder: Path) -> Path:
    """Write the adapter twice: `pytorch_lora_weights.safetensors` (diffusers) and `..._kohya.safetensors` (ComfyUI).

    Tools that ignore the safetensors header (ComfyUI) apply alpha / rank from `alpha` tensors,
    or 1 without them. So when lora_alpha = rank the diffusers file carries the LoRA config in
    its header (scale 1 everywhere); otherwise it carries an `alpha` tensor per module instead
    (diffusers refuses both at once, and reads the tensors just as well).
    """
    from diffusers import ChromaPipeline
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    config = transformer.peft_config["default"]
    state = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in get_peft_model_state_dict(transformer).items()}
    alphas = {k.replace(".lora_A.weight", ".alpha"): torch.tensor(float(config.lora_alpha))
              for k in state if k.endswith(".lora_A.weight")}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if config.lora_alpha == config.r:
        ChromaPipeline.save_lora_weights(folder, transformer_lora_layers=state,
                                         transformer_lora_adapter_metadata=config.to_dict())
    else:
        save_file({f"transformer.{k}": v for k, v in {**state, **alphas}.items()},
                  str(folder / "pytorch_lora_weights.safetensors"), metadata={"format": "pt"})
    save_file(kohya_layout(state, transformer, config.lora_alpha), str(folder / "pytorch_lora_weights_kohya.safetensors"),
              metadata={"ss_network_dim": str(config.r), "ss_network_alpha": str(config.lora_alpha)})
    return folder / "pytorch_lora_weights.safetensors"
