"""Quantize the Chroma transformer once, save it, and reload it without quantizing again.

A saved model is a folder: the quantized state dict (safetensors shards and their
index), quanto's quantization map, the transformer config and a manifest of what made
it. The folder is written under a temporary name and renamed, so a half-written one
never exists.

`quantize_to_folder` never holds the bf16 model: it builds the transformer's skeleton on
the meta device, then reads one block at a time from the checkpoint's safetensors
(memory-mapped), quantizes it, and keeps only the quantized tensors. The peak is close
to the quantized model plus one bf16 block, not the 18 GB of Chroma1 in bf16.
"""

from __future__ import annotations

import fnmatch
import json
import time
from pathlib import Path

import torch

from .config import KEEP_FULL_PRECISION  # the default of base_model_keep_full_precision
from .errors import UserError
from .storage import atomic_dir, combine_hashes, write_json_atomic

# Quantized tensors go to disk in shards of this size, so the host never holds the whole result
# (safetensors' writer briefly copies a shard, so a small shard keeps that copy small too).
# Results wait in memory until a shard is written: small shards keep that wait small (measured with
# int4 on 2 + 4 real-width blocks: peak 2.47 GiB at 512 MB shards, 1.93 GiB at 128 MB).
SHARD_BYTES = 128 * 2**20
QUANTO_PRECISIONS = ("int8-quanto", "int4-quanto", "int2-quanto", "fp8-quanto")
BNB_PRECISIONS = ("nf4-bnb", "int8-bnb")


class QuantizationUnavailable(UserError, RuntimeError):
    """The precision cannot run on this device; the message names what can."""


def _quanto_weights(precision: str):
    from optimum import quanto

    return {
        "int8-quanto": quanto.qint8,
        "int4-quanto": quanto.qint4,
        "int2-quanto": quanto.qint2,
        "fp8-quanto": quanto.qfloat8,
    }[precision]


def quanto_version() -> str:
    return library_version("int8-quanto")


def library_version(precision: str) -> str:
    """The installed version of the library that quantizes to `precision` (its `__version__`), read from the
    package metadata: importing optimum.quanto would import transformers and diffusers to name a cache entry."""
    from importlib.metadata import version

    return version("bitsandbytes" if precision in BNB_PRECISIONS else "optimum-quanto")


def quantized_model_key(transformer_identity: str, precision: str, dtype: torch.dtype, keep=KEEP_FULL_PRECISION) -> str:
    parts = [transformer_identity, precision, str(dtype), ",".join(keep), library_version(precision)]
    if precision in BNB_PRECISIONS:  # its kept layers changed (every block's proj_out quantized, the model's kept): redo
        parts.append("bnb skip list by full name, shared names restored from the checkpoint")
    return combine_hashes(*parts)


def check_available(precision: str, device_kind: str, backends: tuple[str, ...]) -> None:
    if precision in BNB_PRECISIONS and "bitsandbytes" not in backends:
        raise QuantizationUnavailable(
            f"base_model_precision {precision!r} needs bitsandbytes on a CUDA or ROCm GPU, and this run is on "
            f"{device_kind}. Use 'int4-quanto' (about nf4's memory) or 'int8-quanto': optimum-quanto works on every "
            "device, the CPU included."
        )
    if precision in BNB_PRECISIONS:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise QuantizationUnavailable(
                f"base_model_precision {precision!r} needs the bitsandbytes package: pip install -e '.[cuda]'"
            ) from None


def is_complete(folder: Path) -> bool:
    return (Path(folder) / "manifest.json").is_file()


def quantize_model(model, precision: str, keep: tuple[str, ...] = KEEP_FULL_PRECISION):
    """Quantize in place with optimum-quanto and freeze (weights become int/fp8 tensors)."""
    from optimum.quanto import freeze, quantize

    quantize(model, weights=_quanto_weights(precision), exclude=list(keep) or None)
    freeze(model)
    return model


def save_quantized(transformer, precision: str, target: Path, source: dict) -> dict:
    """Quantize `transformer` and write the folder at `target`; returns its manifest."""
    from optimum.quanto import __version__ as quanto_version
    from optimum.quanto import quantization_map
    from safetensors.torch import save_file

    started = time.perf_counter()
    total = sum(p.numel() for p in transformer.parameters())
    quantize_model(transformer, precision)
    qmap = quantization_map(transformer)
    quantized_params = sum(
        module.weight.numel() for name, module in transformer.named_modules() if name in qmap
    )
    with atomic_dir(target) as staging:
        save_file({k: v.contiguous() for k, v in transformer.state_dict().items()}, str(staging / "model.safetensors"))
        (staging / "quantization_map.json").write_text(json.dumps(qmap, indent=1, sort_keys=True))
        transformer.save_config(staging)  # config.json, as diffusers writes it
        manifest = {
            "precision": precision,
            "kept_full_precision": list(KEEP_FULL_PRECISION),
            "quantized_layers": len(qmap),
            "quantized_parameters": int(quantized_params),
            "kept_parameters": int(total - quantized_params),
            "optimum_quanto": quanto_version,
            "seconds": round(time.perf_counter() - started, 3),
            "bytes": (staging / "model.safetensors").stat().st_size,
            **source,
        }
        write_json_atomic(staging / "manifest.json", manifest)  # last: its presence marks the folder complete
    return manifest


def checkpoint_files(transformer_dir: Path) -> dict[str, Path]:
    """Parameter name -> the safetensors file holding it, for a diffusers transformer folder."""
    transformer_dir = Path(transformer_dir)
    index = transformer_dir / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: transformer_dir / file for name, file in weight_map.items()}
    single = transformer_dir / "diffusion_pytorch_model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{transformer_dir} has no diffusion_pytorch_model.safetensors (or its index)")
    from safetensors import safe_open

    with safe_open(single, "pt") as handle:
        return dict.fromkeys(handle.keys(), single)


def quantization_units(transformer) -> list[str]:
    """The pieces quantized one at a time: every transformer block, then "" (what is left: embedders, output)."""
    units = [f"transformer_blocks.{i}" for i in range(len(transformer.transformer_blocks))]
    units += [f"single_transformer_blocks.{i}" for i in range(len(transformer.single_transformer_blocks))]
    return [*units, ""]


def is_kept(full_name: str, keep: tuple[str, ...]) -> bool:
    """Whether `base_model_keep_full_precision` keeps this module: a glob, or a module and everything under it."""
    return any(fnmatch.fnmatch(full_name, pattern) or full_name.startswith(pattern.rstrip("*") + ".") for pattern in keep)


class _ShardWriter:
    """Collects quantized tensors and writes them as numbered safetensors shards plus an index."""

    def __init__(self, folder: Path):
        self.folder, self.pending, self.pending_bytes, self.weight_map, self.count = folder, {}, 0, {}, 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            # A copy, not the state dict's tensor: quanto's int4 tensors keep the quantized module and
            # its float intermediates alive (measured: +0.27 GiB per single block until the shard is written).
            self.pending[name] = tensor.detach().clone(memory_format=torch.contiguous_format)
            self.pending_bytes += tensor.numel() * tensor.element_size()
        if self.pending_bytes >= SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        self.count += 1
        name = f"model-{self.count:05d}.safetensors"
        save_file(self.pending, str(self.folder / name))
        self.weight_map.update(dict.fromkeys(self.pending, name))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> int:
        self.flush()
        write_json_atomic(self.folder / "model.safetensors.index.json", {"weight_map": self.weight_map})
        return sum((self.folder / f).stat().st_size for f in set(self.weight_map.values()))


def quantize_to_folder(
    transformer_dir: Path, precision: str, target: Path, source: dict, dtype: torch.dtype = torch.bfloat16,
    device: str = "cpu", keep: tuple[str, ...] = KEEP_FULL_PRECISION, log=print,
) -> dict:
    """Quantize the checkpoint in `transformer_dir` block by block into the folder `target`; returns its manifest.

    Each block is read from the memory-mapped safetensors in `dtype`, quantized on `device`
    (a GPU is much faster than the CPU at this), and its quantized tensors are moved to the
    host; the bf16 block is then dropped before the next one is read.
    """
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from diffusers import ChromaTransformer2DModel
    from optimum.quanto import quantization_map
    from safetensors import safe_open

    started = time.perf_counter()
    transformer_dir = Path(transformer_dir)
    config = ChromaTransformer2DModel.load_config(transformer_dir)
    with init_empty_weights():  # parameters on "meta": no memory; buffers (rope tables) are real and small
        skeleton = ChromaTransformer2DModel.from_config(config)
    files = checkpoint_files(transformer_dir)
    total = 0
    for path in set(files.values()):
        with safe_open(path, "pt") as handle:
            total += sum(_numel(handle.get_slice(name).get_shape()) for name in handle.keys())
    qmap, quantized, kept_names = {}, 0, []
    units = quantization_units(skeleton)
    with atomic_dir(target) as staging:
        writer = _ShardWriter(staging)
        for number, unit in enumerate(units, 1):
            module = skeleton.get_submodule(unit)  # "" is the skeleton itself, its blocks already dropped
            prefix = f"{unit}." if unit else ""
            names = [name for name, _ in module.named_parameters()]
            missing = [prefix + n for n in names if prefix + n not in files]
            if missing:
                raise KeyError(f"{missing[:3]} missing from the checkpoint in {transformer_dir}: is it a Chroma transformer?")
            # Open the shards for this unit only: a mapping kept open would keep every page read so far resident.
            for path in sorted({files[prefix + n] for n in names}):
                with safe_open(path, "pt") as handle:
                    for name in (n for n in names if files[prefix + n] == path):
                        value = handle.get_tensor(prefix + name)
                        set_module_tensor_to_device(module, name, device, value=value, dtype=dtype)
            linear_names = [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)]
            excluded = [n for n in linear_names if is_kept(prefix + n, keep)]
            if len(excluded) < len(linear_names):
                quantize_model(module, precision, keep=tuple(excluded))
            unit_map = quantization_map(module)
            qmap.update({prefix + name: spec for name, spec in unit_map.items()})
            kept_names += [prefix + n for n in excluded]
            quantized += sum(sub.weight.numel() for name, sub in module.named_modules() if name in unit_map)
            writer.add({prefix + k: v.to("cpu") for k, v in module.state_dict().items()})
            if unit:
                _drop(skeleton, unit)  # the bf16 weights of this block are released here
            if number % 8 == 0 or number == len(units):
                log(f"quantized {number}/{len(units)} parts to {precision}")
        total_bytes = writer.close()
        (staging / "quantization_map.json").write_text(json.dumps(qmap, indent=1, sort_keys=True))
        skeleton.save_config(staging)
        manifest = {
            "precision": precision,
            "kept_full_precision": list(keep),
            "kept_layers": kept_names,
            "quantized_layers": len(qmap),
            "quantized_parameters": int(quantized),
            "kept_parameters": int(total - quantized),
            "optimum_quanto": quanto_version(),
            "seconds": round(time.perf_counter() - started, 3),
            "bytes": total_bytes,
            **source,
        }
        write_json_atomic(staging / "manifest.json", manifest)  # last: its presence marks the folder complete
    return manifest


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _drop(skeleton, unit: str) -> None:
    parent_name, _, child = unit.rpartition(".")
    parent = skeleton.get_submodule(parent_name) if parent_name else skeleton
    parent._modules[child] = torch.nn.Identity()


def linear_names(transformer_config: dict) -> list[str]:
    """Every Linear layer's full name in a Chroma transformer of this config (built on the meta device)."""
    from accelerate import init_empty_weights
    from diffusers import ChromaTransformer2DModel

    with init_empty_weights():
        skeleton = ChromaTransformer2DModel.from_config(transformer_config)
    return [name for name, module in skeleton.named_modules() if isinstance(module, torch.nn.Linear)]


def bnb_skip_modules(keep: tuple[str, ...], linear_names: list[str]) -> tuple[list[str], list[str]]:
    """The `llm_int8_skip_modules` that keep what the quanto path keeps, and what cannot be kept.

    diffusers skips a layer when its own name (the last part) is in the list, or when an entry
    equals its full name or appears in it followed by a dot. So the list holds the kept layers'
    full names; a kept layer whose full name is also another layer's own name (`proj_out`, the
    model's output, is also every single block's output) cannot be listed without keeping those
    too (1.8 B parameters in bf16): it is returned apart, for `restore_kept_layers` to put back.
    """
    kept = [name for name in linear_names if is_kept(name, keep)]
    own_names_of_others = {name.rsplit(".", 1)[-1] for name in linear_names if not is_kept(name, keep)}
    skip = [name for name in kept if name not in own_names_of_others]
    return skip, [name for name in kept if name in own_names_of_others]


def diffusers_would_skip(name: str, skip: list[str]) -> bool:
    """diffusers' bitsandbytes rule (quantizers/bitsandbytes/utils.py), for checking a skip list."""
    own = name.rsplit(".", 1)[-1]
    return own in skip or any(key + "." in name or key == name for key in skip)


def quantize_bnb_to_folder(transformer_dir: Path, precision: str, target: Path, source: dict, dtype: torch.dtype,
                           keep: tuple[str, ...] = KEEP_FULL_PRECISION, log=print) -> dict:
    """bitsandbytes quantizes while diffusers loads the checkpoint (shard by shard, onto the GPU)."""
    from diffusers import BitsAndBytesConfig, ChromaTransformer2DModel

    started = time.perf_counter()
    config = json.loads((transformer_dir / "config.json").read_text())
    names = linear_names(config)
    skip, shared_names = bnb_skip_modules(keep, names)
    wrongly = [n for n in names if diffusers_would_skip(n, skip) != (is_kept(n, keep) and n not in shared_names)]
    if wrongly:
        raise ValueError(f"base_model_keep_full_precision {list(keep)}: bitsandbytes cannot keep exactly these layers "
                         f"({wrongly[:3]} would come out otherwise); use a quanto precision for this list")
    if shared_names:
        log(f"bitsandbytes keeps modules by their own name: {', '.join(shared_names)} share theirs with the blocks' "
            "layers, so they are put back in full precision from the checkpoint after loading")
    if precision == "nf4-bnb":
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                          llm_int8_skip_modules=skip)
    else:
        quantization = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    log(f"loading {transformer_dir} through bitsandbytes ({precision})")
    model = ChromaTransformer2DModel.from_pretrained(transformer_dir, quantization_config=quantization, torch_dtype=dtype,
                                                     use_safetensors=True)
    with atomic_dir(target) as staging:
        model.save_pretrained(staging / "bnb", safe_serialization=True)
        save_kept_layers(transformer_dir, shared_names, staging / KEPT_LAYERS_FILE, dtype)
        restore_kept_layers(model, staging / KEPT_LAYERS_FILE)
        total = sum(p.numel() for p in model.parameters())
        quantized = sum(m.weight.numel() for m in model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt"))
        manifest = {
            "precision": precision, "kept_full_precision": skip + shared_names,
            "restored_from_checkpoint": shared_names, "quantized_parameters": int(quantized),
            "kept_parameters": int(total - quantized), "bitsandbytes": library_version(precision),
            "seconds": round(time.perf_counter() - started, 3),
            "bytes": sum(f.stat().st_size for f in staging.rglob("*.safetensors")), **source,
        }
        write_json_atomic(staging / "manifest.json", manifest)
    return manifest


KEPT_LAYERS_FILE = "kept_layers.safetensors"


def save_kept_layers(transformer_dir: Path, layers: list[str], path: Path, dtype: torch.dtype) -> None:
    """The checkpoint's own weights of `layers`, in `dtype`, for `restore_kept_layers`."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    files = checkpoint_files(transformer_dir)
    tensors = {}
    for name in (f"{layer}.{part}" for layer in layers for part in ("weight", "bias")):
        if name in files:
            with safe_open(files[name], "pt") as handle:
                tensors[name] = handle.get_tensor(name).to(dtype).contiguous()
    save_file(tensors, str(path))


def restore_kept_layers(model, path: Path) -> None:
    """Replace each layer saved in `path` with a plain Linear holding the checkpoint's weights.

    bitsandbytes converted these only because diffusers' skip list matches by a module's own
    name; putting them back makes the bnb model keep exactly what the quanto path keeps.
    """
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    for layer in sorted({name.rsplit(".", 1)[0] for name in tensors}):
        weight, bias = tensors[f"{layer}.weight"], tensors.get(f"{layer}.bias")
        device = next(p.device for p in model.parameters() if p.device.type != "meta")
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
        parent_name, _, child = layer.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)


def _read_for_quanto(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, each copied into memory of its own. quanto keeps the tensors it is
    given as the weights, and those of one file share a buffer at the file's (unaligned) offsets: torch's
    int8 matmul on the CPU crashed the process (SIGSEGV) on such a weight at T5-XXL's width."""
    from safetensors.torch import load_file

    return {name: tensor.clone() for name, tensor in load_file(str(path)).items()}


def load_quantized(folder: Path, device: str):
    """Rebuild the transformer skeleton without allocating weights, then fill it from the saved file."""
    from accelerate import init_empty_weights
    from diffusers import ChromaTransformer2DModel
    from optimum.quanto import requantize

    folder = Path(folder)
    if not is_complete(folder):
        raise FileNotFoundError(f"no complete quantized model in {folder}: materialize quantized_base_model first")
    if (folder / "bnb").is_dir():  # bitsandbytes: its config travels in config.json
        model = ChromaTransformer2DModel.from_pretrained(folder / "bnb", use_safetensors=True, device_map={"": device})
        restore_kept_layers(model, folder / KEPT_LAYERS_FILE)
        return model.eval()
    with init_empty_weights():
        transformer = ChromaTransformer2DModel.from_config(ChromaTransformer2DModel.load_config(folder))
    qmap = json.loads((folder / "quantization_map.json").read_text())
    index = folder / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    state = {}
    for shard in shards:
        state.update(_read_for_quanto(folder / shard))
    requantize(transformer, state, qmap, device=torch.device(device))
    transformer.eval()
    return transformer


def save_quantized_module(model, target: Path, manifest: dict) -> None:
    """Write a module quantized by `quantize_model` to the folder `target`: its state dict (a tensor tied
    to another, like T5's input embedding, once), quanto's map, its config and `manifest` last."""
    from optimum.quanto import quantization_map
    from safetensors.torch import save_file

    state, aliases, first_name_of = {}, {}, {}
    for name, tensor in model.state_dict().items():
        where = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if where in first_name_of:
            aliases[name] = first_name_of[where]
        else:
            first_name_of[where] = name
            state[name] = tensor.contiguous()
    with atomic_dir(target) as staging:
        save_file(state, str(staging / "model.safetensors"))
        (staging / "quantization_map.json").write_text(json.dumps(quantization_map(model), indent=1, sort_keys=True))
        model.config.save_pretrained(staging)
        write_json_atomic(staging / "manifest.json", {**manifest, "tied": aliases,
                                                      "bytes": (staging / "model.safetensors").stat().st_size})


def load_quantized_module(skeleton, folder: Path, dtype: torch.dtype, device: str):
    """Fill `skeleton` (built on the meta device from the saved config) from `save_quantized_module`'s folder."""
    from optimum.quanto import requantize

    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    state = _read_for_quanto(folder / "model.safetensors")
    skeleton.to(dtype)  # the layers quanto leaves alone (norms, embeddings) keep the dtype they were saved in
    requantize(skeleton, state, json.loads((folder / "quantization_map.json").read_text()), device=torch.device(device))
    for alias, name in manifest["tied"].items():  # requantize loads non-strictly: tie what was saved once
        owner, _, attribute = alias.rpartition(".")
        setattr(skeleton.get_submodule(owner), attribute, skeleton.get_parameter(name))
    missing = set(skeleton.state_dict()) - set(state) - set(manifest["tied"])
    if missing:
        raise ValueError(f"{folder} lacks {sorted(missing)[:3]}: delete the folder and it is quantized again")
    return skeleton.eval()
