"""A Chroma transformer as one original-format (BFL) `.safetensors` file, made into a diffusers folder once.

Fine-tunes are often shared as a single `chroma-xyz.safetensors` holding the transformer in the
original layout (`double_blocks.3.img_attn.qkv.weight`). diffusers' single-file loader converts
it; the config it needs is read from the file's own tensor shapes, so no download is involved.
The VAE, T5 and tokenizer are not in such a file: they come from `model_flavour`'s repository.
The converted folder is cached by the file's content, so the conversion (which holds the
transformer in host RAM once) happens once per file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .storage import atomic_dir

BASE_COMPONENTS = ("vae", "text_encoder", "tokenizer", "scheduler")


def config_from_shapes(path: Path) -> dict:
    """The ChromaTransformer2DModel config of an original-format checkpoint, from its header alone."""
    from safetensors import SafetensorError, safe_open

    try:
        handle_context = safe_open(path, "pt")
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({exc})") from None
    with handle_context as handle:
        names = list(handle.keys())
        prefix = "model.diffusion_model." if any(n.startswith("model.diffusion_model.") for n in names) else ""
        keys = [n.removeprefix(prefix) for n in names]

        def shape(name: str) -> list[int]:
            return list(handle.get_slice(prefix + name).get_shape())

        def count(start: str, position: int) -> int:
            return 1 + max(int(k.split(".")[position]) for k in keys if k.startswith(start))

        needed = ("img_in.weight", "txt_in.weight", "distilled_guidance_layer.in_proj.weight")
        blocks = ("double_blocks.", "single_blocks.", "distilled_guidance_layer.layers.")
        if any(k not in keys for k in needed) or not all(any(k.startswith(b) for k in keys) for b in blocks):
            raise ValueError(
                f"{path} is not an original-format Chroma transformer (it lacks some of {', '.join(needed)} or of the "
                "double, single and approximator blocks; a Flux checkpoint, for one, has no approximator)"
            )
        hidden, in_channels = shape("img_in.weight")
        approximator_hidden, approximator_in = shape("distilled_guidance_layer.in_proj.weight")
        return {
            "patch_size": 1, "in_channels": in_channels, "out_channels": None,
            "num_layers": count("double_blocks.", 1), "num_single_layers": count("single_blocks.", 1),
            "attention_head_dim": 128, "num_attention_heads": hidden // 128,  # Chroma's head size
            "joint_attention_dim": shape("txt_in.weight")[1], "axes_dims_rope": [16, 56, 56],
            "approximator_num_channels": approximator_in, "approximator_hidden_dim": approximator_hidden,
            "approximator_layers": count("distilled_guidance_layer.layers.", 2),
        }


def convert(path: Path, target: Path, base_dir: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write `target` as a diffusers Chroma folder: the converted transformer plus `base_dir`'s other parts."""
    from diffusers import ChromaTransformer2DModel

    config = config_from_shapes(path)
    with atomic_dir(target) as staging:
        (staging / "config" / "transformer").mkdir(parents=True)
        (staging / "config" / "transformer" / "config.json").write_text(
            json.dumps({"_class_name": "ChromaTransformer2DModel", **config}))
        transformer = ChromaTransformer2DModel.from_single_file(
            str(path), config=str(staging / "config"), subfolder="transformer", torch_dtype=dtype,
        )
        transformer.save_pretrained(staging / "transformer", safe_serialization=True, max_shard_size="5GB")
        del transformer
        for component in BASE_COMPONENTS:
            os.symlink((base_dir / component).resolve(), staging / component, target_is_directory=True)
        (staging / "model_index.json").write_text((base_dir / "model_index.json").read_text())
    return target
