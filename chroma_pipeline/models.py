"""Where the Chroma weights come from, and loading each component from there.

Every source ends up as a local folder in the diffusers layout (model_index.json,
transformer/, vae/, text_encoder/, tokenizer/, scheduler/) and every component is
loaded from that folder with `from_pretrained(..., use_safetensors=True)`: the tiny and
toy flavours go through exactly the code the real checkpoints use.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .config import FLAVOUR_REPOS, ChromaConfig
from .errors import UserError
from .storage import sha256_file, user_cache_file, write_json_atomic
from .tiny import build_tiny_chroma
from .toy import build_toy_chroma

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
# The settings that decide which weights a step loads, at which dtype: every model-reading step reads them.
MODEL_SETTINGS = ("model_flavour", "pretrained_model_name_or_path", "revision", "mixed_precision")
# Only what the pipeline needs, and only safetensors: nothing gets unpickled.
_ALLOW = ["model_index.json", *(f"{name}/*" for name in COMPONENTS)]
_NEVER = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.msgpack", "*.onnx*"]
# The flavours built here instead of downloaded: each writes a diffusers folder.
LOCAL_BUILDS = {"tiny": build_tiny_chroma, "toy": build_toy_chroma}


class ModelSourceError(UserError, RuntimeError):
    """The model cannot be found or read where the config points; the message lists the ways to provide it."""


def resolve_model_dir(config: ChromaConfig, models_root: Path) -> Path:
    """A local diffusers folder for the configured model, downloading it if needed.

    `tiny` and `toy` are built under `models_root`; a local folder is used as is; a Hugging
    Face id is fetched into the Hugging Face cache (HF_ENDPOINT and HF_HUB_OFFLINE apply).
    """
    source = config.model_source
    if source in LOCAL_BUILDS:
        return LOCAL_BUILDS[source](Path(models_root) / source)
    local = Path(source).expanduser()
    if local.is_file():
        return _from_single_file(local, config, Path(models_root))
    if local.exists():
        if not (local / "model_index.json").is_file():
            raise ModelSourceError(
                f"pretrained_model_name_or_path={source!r} is a folder without model_index.json; "
                "point it at a diffusers-layout Chroma folder (the one holding transformer/, vae/, text_encoder/)"
            )
        return local
    return _download(source, config.revision, _ALLOW)


def _download(repo: str, revision: str | None, allow: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=allow, ignore_patterns=_NEVER))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise ModelSourceError(
            f"could not get {repo!r} from the Hugging Face Hub or its local cache ({type(exc).__name__}: {exc}). "
            "Provide one of: network access (HF_ENDPOINT selects a mirror); a copy in the local Hugging Face cache "
            f"(`huggingface-cli download {repo}` on a machine that has it); pretrained_model_name_or_path set to a "
            "local diffusers folder; or, for the transformer alone, a single original-format .safetensors file (the "
            "VAE and T5 then still come from model_flavour's repository). For an offline smoke test use "
            "model_flavour: tiny."
        ) from None


def _from_single_file(path: Path, config: ChromaConfig, models_root: Path) -> Path:
    """A diffusers folder for a single-file transformer: converted once, cached by the file's content."""
    from . import single_file

    if path.suffix != ".safetensors":
        raise ModelSourceError(
            f"pretrained_model_name_or_path={str(path)!r} is a {path.suffix or 'suffix-less'} file; only .safetensors "
            "single files are loaded (other formats are pickles that can run code)"
        )
    # The VAE and T5 come from the flavour (tiny's and toy's VAEs differ): one conversion per pair.
    target = models_root / "single-file" / f"{weights_digest(path)[:24]}-{config.model_flavour}"
    if (target / "transformer" / "config.json").is_file():
        return target
    if config.model_flavour in LOCAL_BUILDS:
        base = LOCAL_BUILDS[config.model_flavour](models_root / config.model_flavour)
    else:
        base = _download(FLAVOUR_REPOS[config.model_flavour], config.revision,
                         ["model_index.json", *(f"{c}/*" for c in single_file.BASE_COMPONENTS)])
    try:
        return single_file.convert(path, target, base)
    except ValueError as exc:
        raise ModelSourceError(str(exc)) from None


def check_model_source(config: ChromaConfig) -> None:
    """Catch a wrong local model path before any work; Hub ids are checked when first fetched."""
    source = config.pretrained_model_name_or_path
    if not source:
        return
    looks_local = source.startswith((".", "/", "~")) or (os.sep in source and source.count("/") != 1)
    if looks_local and not Path(source).expanduser().exists():
        raise ModelSourceError(
            f"pretrained_model_name_or_path={source!r} does not exist; give a diffusers-layout Chroma folder, "
            "a Hugging Face id like lodestones/Chroma1-HD, or leave it empty to use model_flavour"
        )


def component_identity(model_dir: Path, component: str) -> str:
    """A short fingerprint of one component: its config files and the content of its weights.

    Weights are identified by content, so a fine-tune with the same shapes is a different
    model. Hugging Face cache files are symlinks to blobs named by their sha256, which
    costs nothing to read; other files are hashed once and remembered by size and mtime.
    """
    folder = Path(model_dir) / component
    digest = hashlib.sha256(component.encode())
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        if path.suffix == ".safetensors":
            digest.update(f"{path.name}:{weights_digest(path)}".encode())
        elif path.stat().st_size < 64 * 2**20:  # configs, tokenizer.json, spiece.model; never a stray .bin
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def weights_digest(path: Path) -> str:
    real = Path(os.path.realpath(path))
    if real.parent.name == "blobs" and len(real.name) == 64:  # the Hub cache already did the hashing
        return real.name
    stat = real.stat()
    memo_key = f"{real}:{stat.st_size}:{stat.st_mtime_ns}"
    memo_file = user_cache_file("weight-digests.json")
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if memo_key not in memo:
        memo[memo_key] = sha256_file(real)
        write_json_atomic(memo_file, memo)
    return memo[memo_key]


def vae_config(model_dir: Path) -> dict:
    """The VAE's config.json (latent channels, shift and scaling factors), read without importing diffusers."""
    return json.loads((Path(model_dir) / "vae" / "config.json").read_text())


def text_width(model_dir: Path) -> int:
    """The width of T5's hidden states (4096 for T5-XXL)."""
    return json.loads((Path(model_dir) / "text_encoder" / "config.json").read_text())["d_model"]


def load_transformer(model_dir: Path, dtype: torch.dtype):
    from diffusers import ChromaTransformer2DModel

    return ChromaTransformer2DModel.from_pretrained(model_dir, subfolder="transformer", dtype=dtype, use_safetensors=True)


def load_vae(model_dir: Path, dtype: torch.dtype):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(model_dir, subfolder="vae", dtype=dtype, use_safetensors=True)


def load_text_encoder(model_dir: Path, dtype: torch.dtype):
    from transformers import T5EncoderModel

    return T5EncoderModel.from_pretrained(model_dir, subfolder="text_encoder", dtype=dtype, use_safetensors=True)


def text_encoder_skeleton(config_dir: Path):
    """T5 built from `config_dir`'s config.json with no memory for its weights (on the meta device)."""
    from accelerate import init_empty_weights
    from transformers import T5Config, T5EncoderModel

    with init_empty_weights():
        return T5EncoderModel(T5Config.from_pretrained(config_dir))


def load_tokenizer(model_dir: Path):
    from transformers import T5TokenizerFast

    return T5TokenizerFast.from_pretrained(model_dir, subfolder="tokenizer")


def load_scheduler(model_dir: Path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_pretrained(model_dir, subfolder="scheduler")

