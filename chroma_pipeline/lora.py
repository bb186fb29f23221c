"""Which transformer layers get LoRA (`flux_lora_target`), and saving the adapter.

Presets name diffusers modules of ChromaTransformer2DModel. They are turned into one
anchored regex so `proj_out` of a single block never also matches the model's final
`proj_out`.
"""

from __future__ import annotations

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


def target_modules(preset: str | list[str], num_single_layers: int) -> str:
    """A peft `target_modules` regex for a `flux_lora_target` preset, or for an explicit list of module names.

    A list names diffusers modules: full names (`transformer_blocks.0.attn.to_q`) or the part
    after the block index (`attn.to_q`, `proj_mlp`), which then applies to every block.
    """
    if isinstance(preset, list):
        full = [_escape(name) for name in preset if "blocks." in name]
        inner = [_escape(name) for name in preset if "blocks." not in name]
        parts = ([rf"(single_)?transformer_blocks\.\d+\.({'|'.join(inner)})"] if inner else []) + full
        return "^(" + "|".join(parts) + ")$"
    if preset == "all":
        return _pattern(IMAGE_ATTENTION + TEXT_ATTENTION, SINGLE_ATTENTION)
    if preset == "all+ffs":
        return _pattern(IMAGE_ATTENTION + TEXT_ATTENTION + IMAGE_FFS + TEXT_FFS, SINGLE_ATTENTION + SINGLE_FFS)
    if preset == "context":
        return _pattern(TEXT_ATTENTION, ())
    if preset == "context+ffs":
        return _pattern(TEXT_ATTENTION + TEXT_FFS, ())
    if preset in ("tiny", "nano"):
        # A few single blocks spread over the depth (tiny) or the middle one (nano): a style
        # adapter of a few hundred KB. Positions are relative, so the preset fits any depth.
        fractions = (0.2, 0.35, 0.5, 0.65, 0.8) if preset == "tiny" else (0.5,)
        indices = sorted({min(num_single_layers - 1, int(f * num_single_layers)) for f in fractions})
        return _pattern((), SINGLE_FFS, "|".join(map(str, indices)))
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


def load_initial_adapter(transformer, path: Path) -> int:
    """Start from an existing diffusers-format LoRA (`init_lora`): its A and B replace the fresh ones.

    Returns how many tensors were loaded; every LoRA tensor of the model must be in the file
    with the same shape, so a rank or target mismatch is an error, not a silent partial start.
    """
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    loaded = {k.removeprefix("transformer."): v for k, v in load_file(str(path)).items() if k.startswith("transformer.")}
    expected = get_peft_model_state_dict(transformer)
    missing = sorted(expected.keys() - loaded.keys())
    wrong = sorted(k for k in expected.keys() & loaded.keys() if expected[k].shape != loaded[k].shape)
    if missing or wrong or not loaded:
        raise ValueError(
            f"init_lora {path} does not fit this LoRA (network_rank, flux_lora_target): "
            f"{len(missing)} tensors missing (e.g. {missing[:2]}), {len(wrong)} with another shape (e.g. {wrong[:2]})"
        )
    set_peft_model_state_dict(transformer, {k: loaded[k] for k in expected})
    return len(expected)


def save_adapter(transformer, folder: Path) -> Path:
    """Write `pytorch_lora_weights.safetensors` in the layout ChromaPipeline.load_lora_weights reads.

    The LoRA config travels in the file's metadata, so loaders get rank, alpha and targets
    from it instead of guessing alpha from the tensor shapes.
    """
    from diffusers import ChromaPipeline
    from peft.utils import get_peft_model_state_dict

    state = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in get_peft_model_state_dict(transformer).items()}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ChromaPipeline.save_lora_weights(
        folder,
        transformer_lora_layers=state,
        transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
    )
    return folder / "pytorch_lora_weights.safetensors"
