"""The offline `toy` flavour: a small Chroma whose weights were trained, so its pictures show something.

Same classes and layout as `tiny` and the real checkpoints (ChromaTransformer2DModel, a
16-channel Flux-shaped AutoencoderKL, T5 encoder and tokenizer, the flow-matching scheduler),
but the VAE and the transformer were trained by `python -m chroma_pipeline.toy_training` on
generated captioned pictures at 64 px ("a red circle on a blue background"); the T5 encoder
is the tiny flavour's, frozen. The trained files are committed under `toy_weights/` and
checked against the sha256 sums below before every build, so a damaged or half-updated copy
is refused instead of drawing nonsense.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from .errors import UserError
from .storage import atomic_dir, sha256_file
from .tiny import chroma_scheduler, tiny_vocab

TOY_WEIGHTS = Path(__file__).parent / "toy_weights"
# The resolution the transformer was trained at (8x8 latents, 4x4 image tokens).
TOY_RESOLUTION = 64
# The guidance_scale its held-out colours were measured best at (toy_weights/training.json).
TOY_GUIDANCE = 4.0
# Bump when the assembled folder's layout changes, so stale builds are not reused.
TOY_VERSION = 1

# Every committed file the build copies, with its sha256. toy_training prints this table
# after training; paste it here together with the new files.
WEIGHT_SHA256 = {
    "text_encoder/config.json": "53ebf621a9ed32e918487def4765f83cd51c079284ba0eaf062600e9317a54e2",
    "text_encoder/model.safetensors": "ff8bb558b7f1ae274ec74b7176d7f7f3a8fd4e9eab4a782dbc989a4b08265dad",
    "transformer/config.json": "96bb4adfa0a4e178518b3e7e2732ba893de2ca1e162ac3021a89cbf28ca5ec07",
    "transformer/diffusion_pytorch_model.safetensors": "a00a5881e86d4395091e2ab0a5d87fdfcda2460c4171c99d7546b6589db0e67b",
    "vae/config.json": "17969d0958d770091d26aeb56a537e17e6e1ada326de62e7fa5454ef407b3a43",
    "vae/diffusion_pytorch_model.safetensors": "c90dbaeb0fdab80626496a7b76fb4a6776706f5b4da53c0ca5bd05cb4ff2c6a2",
}


class ToyWeightsError(UserError, RuntimeError):
    """A committed toy weight file is missing or not the one that was trained."""


def check_toy_weights(weights_dir: Path = TOY_WEIGHTS, expected: dict[str, str] | None = None) -> None:
    expected = WEIGHT_SHA256 if expected is None else expected
    for name, digest in expected.items():
        path = Path(weights_dir) / name
        if not path.is_file():
            raise ToyWeightsError(f"the toy model's file {path} is missing: restore it (git checkout -- {path}) "
                                  "or re-run `python -m chroma_pipeline.toy_training`")
        if sha256_file(path) != digest:
            raise ToyWeightsError(f"the toy model's file {path} is not the trained one (its sha256 differs from "
                                  "chroma_pipeline/toy.py's WEIGHT_SHA256): restore it (git checkout -- "
                                  f"{path}) or re-run `python -m chroma_pipeline.toy_training` and update WEIGHT_SHA256")


def model_index() -> dict:
    """What diffusers writes for a ChromaPipeline: which class loads each subfolder."""
    import diffusers
    from transformers import T5TokenizerFast

    return {
        "_class_name": "ChromaPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", T5TokenizerFast.__name__],
        "transformer": ["diffusers", "ChromaTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def assemble(staging: Path, weights_dir: Path, names) -> None:
    """Lay out a diffusers folder in `staging`: the trained files as they are, plus tokenizer, scheduler, index."""
    from transformers import T5TokenizerFast

    for name in names:
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(weights_dir) / name, staging / name)
    T5TokenizerFast(vocab=tiny_vocab(), extra_ids=0).save_pretrained(staging / "tokenizer")
    chroma_scheduler().save_pretrained(staging / "scheduler")
    (staging / "model_index.json").write_text(json.dumps(model_index(), indent=2) + "\n")


def build_toy_chroma(target: Path, weights_dir: Path = TOY_WEIGHTS, expected: dict[str, str] | None = None) -> Path:
    """Write the toy model to `target` (a diffusers folder) unless a complete build of these weights is there.

    Written under a temporary name and renamed into place, like build_tiny_chroma.
    """
    target = Path(target)
    expected = WEIGHT_SHA256 if expected is None else expected
    weights = hashlib.sha256(json.dumps(expected, sort_keys=True).encode()).hexdigest()[:16]
    stamp = target / "toy_build.json"
    if stamp.exists() and json.loads(stamp.read_text()) == {"version": TOY_VERSION, "weights": weights}:
        return target
    check_toy_weights(weights_dir, expected)
    with atomic_dir(target) as staging:
        assemble(staging, weights_dir, expected)
        (staging / "toy_build.json").write_text(json.dumps({"version": TOY_VERSION, "weights": weights}))
    return target


def weight_sha256(weights_dir: Path) -> dict[str, str]:
    """The table WEIGHT_SHA256 should hold for the files in `weights_dir`."""
    return {name: sha256_file(Path(weights_dir) / name) for name in WEIGHT_SHA256}
