"""Training checkpoints that survive a crash and are never trusted blindly.

A checkpoint is a folder `step_000050/` holding everything the loop needs to continue as if
it had never stopped: the LoRA weights, the AdamW state, the LR scheduler and loss scaler,
the global random state (LoRA dropout), how many batches the sampler has handed out
(which also fixes the noise of every batch to come), the losses so far and the progress
renders. Tensors go to safetensors and the rest to JSON: nothing is unpickled
on resume. The folder is written under a temporary name and renamed, and its manifest lists
each file's sha256; a checkpoint whose files do not match is skipped with a warning.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .storage import atomic_dir, sha256_file, write_json_atomic


def _optimizer_tensors(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            tensors[f"{index}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, {"param_groups": state["param_groups"]}


def _restore_optimizer(optimizer, tensors: dict[str, torch.Tensor], info: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})


def save_checkpoint(folder: Path, step: int, *, transformer, optimizer, scheduler, scaler, batches_drawn: int,
                    losses: list[float], progress: dict, keep_last: int | None, extra: dict | None = None) -> Path:
    from peft.utils import get_peft_model_state_dict

    target = Path(folder) / f"step_{step:06d}"
    with atomic_dir(target) as staging:
        adapter = {k: v.detach().float().contiguous().cpu() for k, v in get_peft_model_state_dict(transformer).items()}
        save_file(adapter, str(staging / "adapter.safetensors"))
        tensors, optimizer_info = _optimizer_tensors(optimizer)
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(staging / "optimizer.safetensors"))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
        save_file(rng, str(staging / "rng.safetensors"))
        scheduler_state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        for render_step, picture in progress.items():
            (staging / "progress").mkdir(exist_ok=True)
            picture.save(staging / "progress" / f"step_{render_step:06d}.png")
        (staging / "state.json").write_text(json.dumps({
            "step": step, "batches_drawn": batches_drawn, "losses": losses, "optimizer": optimizer_info,
            "scheduler": scheduler_state, "scaler": scaler.state_dict() if scaler is not None else {},
            "python_random": random.getstate(),
            **(extra or {}),
        }))
        files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
        write_json_atomic(staging / "manifest.json", {"step": step, "files": {f: sha256_file(staging / f) for f in files}})
    if keep_last:
        for old in sorted(Path(folder).glob("step_*"))[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def verified(checkpoint: Path) -> str | None:
    """None when every file is present and matches its hash; otherwise what is wrong."""
    manifest = checkpoint / "manifest.json"
    if not manifest.is_file():
        return "no manifest (the process died while writing it)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return "unreadable manifest"
    for name, digest in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != digest:
            return f"{name} does not match its hash"
    return None


def newest_usable(folder: Path, warn=print) -> Path | None:
    """The newest checkpoint that verifies; each newer one that does not is reported and skipped."""
    folder = Path(folder)
    for leftover in folder.glob(".step_*") if folder.is_dir() else []:  # atomic_dir staging, never renamed
        warn(f"ignoring {leftover.name}: a checkpoint that was being written when the process stopped")
    for checkpoint in sorted(folder.glob("step_*"), reverse=True) if folder.is_dir() else []:
        problem = verified(checkpoint)
        if problem is None:
            return checkpoint
        warn(f"skipping checkpoint {checkpoint.name}: {problem}")
    return None


def restore_checkpoint(checkpoint: Path, *, transformer, optimizer, scheduler, scaler) -> dict:
    """Load everything `save_checkpoint` wrote back into the live objects; returns the JSON state."""
    from peft.utils import set_peft_model_state_dict

    state = json.loads((checkpoint / "state.json").read_text())
    adapter = load_file(str(checkpoint / "adapter.safetensors"))
    incompatible = set_peft_model_state_dict(transformer, adapter)
    if getattr(incompatible, "unexpected_keys", None):
        raise RuntimeError(f"{checkpoint}: LoRA keys that match no layer: {incompatible.unexpected_keys[:3]}")
    _restore_optimizer(optimizer, load_file(str(checkpoint / "optimizer.safetensors")), state["optimizer"])
    scheduler.load_state_dict({**scheduler.state_dict(), **state["scheduler"]})
    if scaler is not None and state["scaler"]:  # fp16 only: accelerate has no scaler otherwise
        scaler.load_state_dict(state["scaler"])
    rng = load_file(str(checkpoint / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and "cuda.0" in rng:
        torch.cuda.set_rng_state_all([rng[f"cuda.{i}"] for i in range(torch.cuda.device_count()) if f"cuda.{i}" in rng])
    version, internal, gauss = state["python_random"]
    random.setstate((version, tuple(internal), gauss))
    return state
