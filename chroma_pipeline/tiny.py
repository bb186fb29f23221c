"""The offline `tiny` flavour: a small, random-initialised Chroma in the diffusers layout.

It has every component of the real model (ChromaTransformer2DModel, a 16-channel
Flux-shaped AutoencoderKL, a T5 encoder and tokenizer, the flow-matching scheduler),
only narrower and shallower, so tests, CI and the demo run the same loading code as
`lodestones/Chroma1-Base` without downloading anything. Building it twice with the
same seed gives byte-identical files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .storage import atomic_dir

TINY_SEED = 0
# Bump when the architecture below changes, so stale builds are not reused.
TINY_VERSION = 1

TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=64,  # 16 latent channels packed 2x2, as in the real model
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,  # = the tiny T5's d_model
    axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
    approximator_num_channels=16,
    approximator_hidden_dim=32,
    approximator_layers=1,
)

# Flux's VAE shape (4 levels -> 8x downsampling, 16 latent channels) at a fraction of the width.
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[16, 16, 32, 32],
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=8,
    sample_size=64,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)

T5_CONFIG = dict(
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=32,
    feed_forward_proj="gated-gelu",  # T5 v1.1, like the XXL encoder Chroma uses
    dropout_rate=0.0,
    is_encoder_decoder=False,
    use_cache=False,
    tie_word_embeddings=False,
)

# A fixed word list gives a real sub-word vocabulary without training anything, so the
# tokenizer is identical on every machine. Characters come last so any text tokenizes.
_WORDS = """a an the of and with in on at by for from to under over near beside
red green blue yellow orange purple pink black white grey gray brown gold silver
small large big tiny bright dark soft sharp round square tall wide striped dotted
circle circles square squares triangle triangles line lines stripe stripes ring rings
photo photograph painting drawing picture image sketch render illustration portrait
landscape sky sea water tree trees flower flowers mountain city street house cat dog
bird person woman man face hand light shadow night day sun moon star stars cloud
background foreground center left right top bottom corner pattern texture shape shapes
gradient canvas style color colour colors abstract geometric minimal detailed sunset
""".split()
_CHARACTERS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()/&")


def tiny_vocab() -> list[tuple[str, float]]:
    """Unigram pieces with scores: specials, whole words, then single characters."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    seen = set()
    for word in _WORDS:
        piece = "\u2581" + word
        if piece not in seen:
            seen.add(piece)
            vocab.append((piece, -2.0 - 0.01 * len(vocab)))
    vocab.append(("\u2581", -3.0))
    vocab += [(char, -8.0) for char in _CHARACTERS]
    return vocab


def _build_components():
    from diffusers import AutoencoderKL, ChromaTransformer2DModel
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    tokenizer = T5TokenizerFast(vocab=tiny_vocab(), extra_ids=0)
    torch.manual_seed(TINY_SEED)
    transformer = ChromaTransformer2DModel(**TRANSFORMER_CONFIG)
    torch.manual_seed(TINY_SEED + 1)
    vae = AutoencoderKL(**VAE_CONFIG)
    torch.manual_seed(TINY_SEED + 2)
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), **T5_CONFIG))
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder,
                tokenizer=tokenizer, scheduler=chroma_scheduler())


def chroma_scheduler():
    """The same scheduler settings as the published Chroma1 checkpoints."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
        base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
    )


def build_tiny_chroma(target: Path) -> Path:
    """Write the tiny model to `target` (a diffusers folder) unless a complete build is there.

    The folder is written under a temporary name and renamed into place, so an
    interrupted build never looks complete.
    """
    target = Path(target)
    stamp = target / "tiny_build.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("version") == TINY_VERSION:
        return target

    from diffusers import ChromaPipeline  # only to build: a complete build is reused without importing diffusers

    with atomic_dir(target) as staging:
        pipe = ChromaPipeline(**_build_components())
        pipe.save_pretrained(staging, safe_serialization=True)
        (staging / "tiny_build.json").write_text(json.dumps({"version": TINY_VERSION, "seed": TINY_SEED}))
    return target
