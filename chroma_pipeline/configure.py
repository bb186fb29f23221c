"""`chroma-pipeline configure`: write a commented training config by answering a few questions.

The counterpart of SimpleTuner's `simpletuner configure`: it asks the quickstart's questions one at
a time (each with its default in brackets), looks at the device, proposes a `base_model_precision`
from the project's memory estimate (and prints the figures behind it), and writes a JSONC config
that `load_config` reads. Every question has a flag; `--yes` takes the defaults for the rest and
never prompts, for scripts. Existing files are never replaced without a yes (or `--force`).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import typing
import warnings
from pathlib import Path

from .commands import dagster_dev_command
from .config import FLAVOUR_REPOS, FLAVOURS, LOCAL_FLAVOURS, ChromaConfig, ConfigError, config_from_dict, load_config
from .dataset import IMAGE_SUFFIXES
from .demo_data import demo_config
from .device import DeviceInfo, detect_device
from .errors import UserError, run_command
from .memory import AUTO_ORDER, AUTO_SHARE, choose_precision
from .quantized_base import estimates_for
from .storage import write_bytes_atomic
from .tiny import TRANSFORMER_CONFIG as TINY_TRANSFORMER_CONFIG
from .toy import TOY_GUIDANCE, TOY_RESOLUTION, TOY_WEIGHTS

PRECISIONS = typing.get_args(ChromaConfig.model_fields["base_model_precision"].annotation)
GIB = 2**30


class WizardError(UserError):
    """A flag value or a situation the wizard refuses; the message says what to do."""


# --- asking --------------------------------------------------------------------------------------
def ask(question: str, default, parse, *, flag: str, given, interactive: bool, show=str):
    """A flag's value when given, else the default (non-interactive) or the user's answer (empty: default)."""
    if given is not None:
        try:
            return parse(given)
        except ValueError as exc:
            raise WizardError(f"{flag} {given!r}: {exc}") from None
    if not interactive:
        return default
    while True:
        answer = read_answer(f"{question} [{show(default)}]: ", flag).strip()
        if not answer:
            return default
        try:
            return parse(answer)
        except ValueError as exc:
            print(f"  {exc}; try again")


def confirm(question: str, flag: str) -> bool:
    return read_answer(f"{question} [y/N]: ", flag).strip().lower() in ("y", "yes")


def read_answer(prompt: str, flag: str) -> str:
    try:
        return input(prompt)
    except EOFError:
        raise WizardError(f"no answer to {prompt.strip()!r} (input ended): give {flag}, or --yes to take the defaults") from None


def choice(allowed):
    def parse(answer: str) -> str:
        if answer not in allowed:
            raise ValueError(f"choose one of {', '.join(allowed)}")
        return answer
    return parse


def positive_int(answer: str) -> int:
    if not answer.strip().isdigit() or int(answer) < 1:
        raise ValueError("give a whole number of 1 or more")
    return int(answer)


def resolution(answer: str) -> int:
    value = positive_int(answer)
    if value % 64 or value < 64:
        raise ValueError(f"must be a multiple of 64 pixels (try {max(64, round(value / 64) * 64)})")
    return value


def prompts(answer: str | list[str]) -> list[str]:
    """Typed: one line, prompts separated by |. From flags: the list of --prompt values, as they are."""
    parts = answer.split("|") if isinstance(answer, str) else answer
    found = [part.strip() for part in parts if part.strip()]
    if not found:
        raise ValueError("give at least one prompt (several: separate them with |)")
    return found


def yes_no(answer: str) -> bool:
    if answer.lower() not in ("y", "yes", "n", "no"):
        raise ValueError("answer y or n")
    return answer.lower() in ("y", "yes")


def may_write(path: Path, args) -> bool:
    """True when `path` is free, or its owner said yes (`--force`, or y when asked)."""
    if not path.exists() or args.force:
        return True
    if args.yes:
        raise WizardError(f"{path} already exists; not replacing it. Pass --force to replace it, or --config elsewhere.")
    return confirm(f"{path} already exists. Replace it?", "--force")


# --- what to propose --------------------------------------------------------------------------------
def flavour_defaults(flavour: str) -> dict:
    """Settings that depend on the flavour: the quickstart's and config defaults for real ones, the demo's for tiny and toy."""
    if flavour in LOCAL_FLAVOURS:  # small and fast on a CPU: what `chroma-demo` trains
        demo = demo_config(Path("dataset"), Path("output"))
        keep = ("resolution", "learning_rate", "train_batch_size", "max_train_steps", "gradient_checkpointing",
                "tokenizer_max_length", "validation_prompt", "validation_seed")
        defaults = {key: demo[key] for key in keep}
        if flavour == "toy":  # the resolution and guidance it was trained and measured at
            defaults.update(resolution=TOY_RESOLUTION, validation_guidance_real=TOY_GUIDANCE,
                            validation_prompt=["a red circle on a blue background", "a yellow square on a black background"])
        return defaults
    fields = ChromaConfig.model_fields
    return {"resolution": 1024, "learning_rate": 2e-4, "train_batch_size": 1,
            "max_train_steps": fields["max_train_steps"].default, "gradient_checkpointing": True, "tokenizer_max_length": 512,
            "validation_prompt": [fields["validation_prompt"].default], "validation_seed": [fields["validation_seed"].default]}


def transformer_config(flavour: str) -> dict:
    """The transformer's config without its weights: diffusers' defaults are Chroma1's (19 + 38 blocks)."""
    from accelerate import init_empty_weights
    from diffusers import ChromaTransformer2DModel

    with init_empty_weights():  # meta device: nothing allocated
        local = {"tiny": TINY_TRANSFORMER_CONFIG,
                 "toy": json.loads((TOY_WEIGHTS / "transformer" / "config.json").read_text())}
        model = ChromaTransformer2DModel.from_config(local.get(flavour, {}))
    return {key: value for key, value in model.config.items() if not key.startswith("_")}


def propose_precision(settings: dict, device: DeviceInfo) -> tuple[str, str]:
    """What `base_model_precision: auto` would pick on this device, printing the figures; and why."""
    flavour = settings["model_flavour"]
    estimates = estimates_for(config_from_dict(settings, "configure"), transformer_config(flavour), device)
    free = device.free_memory_bytes()
    memory = "host RAM" if device.kind == "cpu" else "device memory"
    print(f"\nDevice: {device.name} ({device.kind}), {free / GIB:.1f} GiB of {memory} free; "
          f"auto may use {AUTO_SHARE:.0%} = {free * AUTO_SHARE / GIB:.1f} GiB.")
    if device.kind == "cpu" and flavour not in LOCAL_FLAVOURS:
        print("  Training the real Chroma (8.9B parameters) on a CPU is impractically slow: write the config here if you "
              "like, but train on a CUDA/ROCm GPU or Apple MPS.")
    if "bitsandbytes" not in device.quantization_backends:
        print(f"  nf4-bnb and int8-bnb (bitsandbytes) need CUDA/ROCm; on {device.kind} only the quanto precisions work.")
    print(f"Training estimate for {flavour} at rank {settings['network_rank']}, {settings['resolution']} px, "
          f"batch {settings['train_batch_size']}:")
    for precision in AUTO_ORDER:
        needed = estimates[precision].training_device
        verdict = "fits" if needed <= free * AUTO_SHARE else "does not fit"
        print(f"  {precision:<12} {needed / GIB:6.1f} GiB  {verdict}")
    try:
        precision, _ = choose_precision("auto", estimates, device.kind, free)
        reason = (f"the most precise that fits in {AUTO_SHARE:.0%} of the {free / GIB:.1f} GiB free on {device.kind} "
                  f"(training needs about {estimates[precision].training_device / GIB:.1f} GiB)")
    except MemoryError as exc:
        precision, reason = AUTO_ORDER[-1], f"nothing fits: {exc}"
        print(f"  {exc}")
    print(f"Proposed base_model_precision: {precision}, {reason}\n")
    return precision, reason


# --- writing --------------------------------------------------------------------------------------
COMMENTS = {
    "model_type": "SimpleTuner's key names throughout; this trains a LoRA adapter",
    "model_family": "the Chroma1 model family",
    "model_flavour": "base | hd | flash (lodestones/Chroma1-Base, -HD, -Flash) | tiny (offline test model) | "
                     "toy (offline, trained on 64 px shapes)",
    "instance_data_dir": "images with same-name .txt captions (or a metadata.jsonl); relative to this file",
    "data_backend_config": "SimpleTuner's dataloader file (datasets, captions, caches), beside this file",
    "output_dir": "manifest, caches, quantized model, adapter and grid go here; relative to this file",
    "resolution": "pixel_area: the area of a resolution x resolution square; a multiple of 64",
    "resolution_type": "pixel (shorter edge), pixel_area, or area (megapixels)",
    "network_rank": "LoRA rank; lora_alpha defaults to it",
    "learning_rate": "the quickstart uses 2e-4 for Chroma; lower it to 1e-4 if training diverges early",
    "mixed_precision": "GPUs compute in bf16 (fp16 where bf16 is missing), CPUs in fp32",
    "gradient_checkpointing": "trades compute for memory (the quickstart keeps it on for Chroma)",
    "train_batch_size": "images per step",
    "max_train_steps": "optimizer steps in all",
    "tokenizer_max_length": "T5 tokens per caption (Chroma: up to 512)",
    "validation_prompt": "rendered with and without the LoRA in the validation grid",
    "validation_seed": "one grid column per seed; the same seeds give the same grid",
    "validation_guidance_real": "the pipeline's guidance_scale: 1.0 single pass, 2-3 for classifier-free guidance",
    "validation_num_inference_steps": "20 for previews, 28-32 for quality",
}


ORDER = ("model_type", "model_family", "model_flavour", "instance_data_dir", "data_backend_config", "output_dir",
         "resolution", "resolution_type", "base_model_precision", "network_rank", "learning_rate", "mixed_precision",
         "gradient_checkpointing", "train_batch_size", "max_train_steps", "tokenizer_max_length", "validation_prompt",
         "validation_seed", "validation_guidance_real", "validation_num_inference_steps")


def render_jsonc(values: dict, header: list[str], comments: dict) -> str:
    lines = [f"// {line}" for line in header] + ["{"]
    for index, (key, value) in enumerate(values.items()):
        if key in comments:
            lines.append(f"  // {comments[key]}")
        lines.append(f"  {json.dumps(key)}: {json.dumps(value)}{',' if index < len(values) - 1 else ''}")
    return "\n".join(lines + ["}", ""])


def written_path(path: Path, base: Path) -> str:
    """Relative to the config's folder when inside it (the project moves as one), else absolute."""
    path, base = path.resolve(), base.resolve()
    return path.relative_to(base).as_posix() if path.is_relative_to(base) else str(path)


def data_backends(dataset: str, settings: dict) -> list[dict]:
    """SimpleTuner's multidatabackend.json: one local image dataset, and the text-embeds entry SimpleTuner
    requires (it has no effect here, and keeps the file usable by SimpleTuner too)."""
    name = Path(dataset).name or "dataset"
    return [
        {"id": name, "type": "local", "instance_data_dir": dataset, "resolution": settings["resolution"],
         "resolution_type": settings["resolution_type"], "minimum_image_size": 0, "caption_strategy": "textfile",
         "repeats": 0, "crop": False},
        {"id": "text-embeds", "dataset_type": "text_embeds", "default": True, "type": "local",
         "cache_dir": "cache/text/{model_family}"},
    ]


# --- the wizard -----------------------------------------------------------------------------------
def parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavour", help=f"model flavour: {' | '.join(FLAVOURS)}")
    p.add_argument("--dataset", help="folder of images with .txt captions")
    p.add_argument("--output-dir", help="where the pipeline writes caches, models, the adapter and the grid")
    p.add_argument("--rank", help="LoRA rank (network_rank)")
    p.add_argument("--steps", help="max_train_steps")
    p.add_argument("--prompt", action="append", help="a validation prompt (repeat for several)")
    p.add_argument("--resolution", help="training resolution in pixels, a multiple of 64")
    p.add_argument("--precision", help=f"base_model_precision, instead of the proposal: {' | '.join(PRECISIONS)}")
    p.add_argument("--multidatabackend", action="store_true", help="write multidatabackend.json instead of instance_data_dir")
    p.add_argument("--config", default="config.jsonc", help="the file to write (default: config.jsonc)")
    p.add_argument("--yes", "--non-interactive", dest="yes", action="store_true",
                   help="take the defaults for anything not given; never prompt")
    p.add_argument("--force", action="store_true", help="replace existing files without asking")
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parser(prog).parse_args(argv)
    try:
        return run(args)
    except WizardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run(args) -> int:
    config_path = Path(args.config)
    interactive = not args.yes
    if not may_write(config_path, args):
        print(f"Kept {config_path} unchanged.")
        return 1

    def question(text, default, parse, flag, given, show=str):
        return ask(text, default, parse, flag=flag, given=given, interactive=interactive, show=show)

    flavour = question(f"Model flavour ({' | '.join(FLAVOURS)})", "base", choice(FLAVOURS), "--flavour", args.flavour)
    defaults = flavour_defaults(flavour)
    while True:
        dataset = Path(question("Dataset folder", ChromaConfig.model_fields["instance_data_dir"].default, str,
                                "--dataset", args.dataset))
        if dataset.is_dir():
            images = [p for p in dataset.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
            print(f"  {dataset}: {len(images)} images, {sum(p.with_suffix('.txt').is_file() for p in images)} "
                  "with a .txt caption")
            break
        if not interactive or args.dataset is not None:
            raise WizardError(f"--dataset {str(dataset)!r}: no such folder. Give a folder of images with .txt captions "
                              "(create it first).")
        if confirm(f"  {dataset} does not exist. Write the config anyway (add the images before training)?", "--dataset"):
            break
    while True:
        output = Path(question("Output folder", ChromaConfig.model_fields["output_dir"].default, str,
                               "--output-dir", args.output_dir))
        if not output.resolve().is_relative_to(dataset.resolve()):
            break
        message = f"--output-dir {str(output)!r} is inside the dataset folder; put it beside the dataset"
        if not interactive or args.output_dir is not None:
            raise WizardError(message)
        print(f"  {message}")

    settings = {"model_type": "lora", "model_family": "chroma", "model_flavour": flavour}
    settings["network_rank"] = question("LoRA rank (network_rank)", 16, positive_int, "--rank", args.rank)
    settings["max_train_steps"] = question("Training steps (max_train_steps)", defaults["max_train_steps"], positive_int,
                                           "--steps", args.steps)
    settings["validation_prompt"] = question(
        "Validation prompt(s), separated by |", defaults["validation_prompt"], prompts, "--prompt", args.prompt,
        show=" | ".join)
    settings["resolution"] = question("Resolution in pixels", defaults["resolution"], resolution,
                                      "--resolution", args.resolution)
    settings["resolution_type"] = "pixel_area"
    for key in ("learning_rate", "train_batch_size", "gradient_checkpointing", "tokenizer_max_length", "validation_seed"):
        settings[key] = defaults[key]
    settings["mixed_precision"] = "bf16"

    device = detect_device()
    proposal, reason = propose_precision(settings, device)
    precision = question("Base model precision (base_model_precision)", proposal, choice(PRECISIONS),
                         "--precision", args.precision)
    if precision in ("nf4-bnb", "int8-bnb") and "bitsandbytes" not in device.quantization_backends:
        print(f"  note: {precision} will not run on this {device.kind} device; train on CUDA/ROCm")
    settings["base_model_precision"] = precision
    settings.update(validation_guidance_real=defaults.get("validation_guidance_real", 1.0), validation_num_inference_steps=20)
    use_backends = args.multidatabackend or (interactive and question(
        "Write a multidatabackend.json (SimpleTuner's dataloader file) instead of instance_data_dir? (y/n)", False,
        yes_no, "--multidatabackend", None, show=lambda d: "y" if d else "n"))

    base = config_path.parent
    data, out = written_path(dataset, base), written_path(output, base)
    try:  # every value checked before anything is written
        config_from_dict({**settings, "instance_data_dir": data, "output_dir": out}, "configure")
    except ConfigError as exc:
        raise WizardError(str(exc)) from None
    backends_path = base / "multidatabackend.json"
    if use_backends and not may_write(backends_path, args):
        print(f"Kept {backends_path} unchanged; wrote nothing.")
        return 1

    paths = {"data_backend_config": backends_path.name} if use_backends else {"instance_data_dir": data}
    settings.update(paths, output_dir=out)
    values = {key: settings[key] for key in ORDER if key in settings}
    why = f"configure proposed it: {reason}" if precision == proposal else f"your choice; configure proposed {proposal}"
    comments = {**COMMENTS, "base_model_precision": f"{why}. \"auto\" decides on the training machine itself"}
    if values.get("model_flavour") in LOCAL_FLAVOURS:
        comments["learning_rate"] = "the demo's rate for the tiny model; the quickstart uses 2e-4 for the real Chroma"
    header = [f"Written by `chroma-pipeline configure` on {device.name} ({device.kind}).",
              f"Keys are SimpleTuner's; see README 'Config keys'. model_flavour {flavour}: "
              f"{FLAVOUR_REPOS.get(flavour, 'built locally, nothing downloaded')}."]
    if use_backends:
        backends = json.dumps(data_backends(data, values), indent=2) + "\n"
        write_bytes_atomic(backends_path, backends.encode())
        print(f"Wrote {backends_path}")
    write_bytes_atomic(config_path, render_jsonc(values, header, comments).encode())
    print(f"Wrote {config_path}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_config(config_path)
    for warning in caught:
        print(f"  note: {warning.message}")
    # Absolute paths throughout: both commands work from any folder.
    config_file = config_path.resolve()
    train = f"{shlex.quote(sys.executable)} -m chroma_pipeline.train --config {shlex.quote(str(config_file))}"
    print(f"Next: {dagster_dev_command({'CHROMA_CONFIG': str(config_file)})}   (or {train})")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """The `chroma-pipeline` command: `chroma-pipeline configure [flags]`."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["configure"]:
        print("usage: chroma-pipeline configure [flags]   (chroma-pipeline configure --help lists them)", file=sys.stderr)
        return 2
    prog = "chroma-pipeline configure"
    return run_command(lambda args: main(args, prog=prog), prog, argv[1:])


if __name__ == "__main__":
    prog = "python -m chroma_pipeline.configure"
    sys.exit(run_command(lambda args: main(args, prog=prog), prog))
