"""Training learns, measured from outside: the tests fail if the LoRA stops learning.

A LoRA is trained through the pipeline (Dagster, the demo's settings, the `toy` Chroma that
draws) on the demo's dataset: every picture drawn white on black while its caption names other
colours ("a red circle on a blue background"). Then it is judged only with diffusers' own
ChromaPipeline (its VAE, its T5 masking, its packing, its sampler), never with our flow.py, so a
bug in our training math cannot hide itself in the measurement:

- held-out loss: pictures and captions the LoRA never saw, at fixed sigmas and fixed noise,
  the flow-matching loss falls by a stated fraction against the base model;
- the style in pictures: renders of held-out prompts lose the colours their caption names
  (`colourfulness`, the mean distance from the grey axis) by a stated share of the way from
  the base model's renders, the control, to the training pictures.

The same measurements are then repeated with three bugs planted in our training code: the
flow target's sign flipped, the timestep passed x1000, the text mask inverted. Each must make
the learning checks fail; if one did not, the checks would not be guarding anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from dagster import DagsterInstance

from assets.definitions import materialize_chain
from chroma_pipeline import flow, training
from chroma_pipeline.config import load_config
from chroma_pipeline.demo_data import DEMO_IMAGES, make_demo_dataset, style_demo_config, write_demo
from chroma_pipeline.demo_style import STYLE_COLOURS, colourfulness
from chroma_pipeline.models import resolve_model_dir

# The held-out loss is read in two bands of noise, because the bugs below hide in different ones:
# at low noise the picture is nearly there and only the timestep says how little is left to remove
# (a timestep bug shows here); at high noise only the caption says what to draw (a mask bug shows
# here). Four noise draws per sigma, fixed.
LOW_NOISE = (0.05, 0.1)
HIGH_NOISE = (0.7, 0.9, 0.97)
NOISE_DRAWS = 4
# Measured on the demo's 600 steps, held-out loss change at low / high noise, colourfulness of renders
# (base model 126.3, training pictures 0.0):
#   correct training      -63.5% / -56.0%, renders 16.4
#   target sign flipped  +176.8% / +62.3%, renders 54.4
#   timestep x1000        -45.8% / -58.2%, renders 15.6 (only the low-noise loss sees it)
#   text mask inverted    -60.3% / -17.7%, renders 121.7
# Each threshold sits half-way between the correct run and the bug it is there to catch.
LOW_NOISE_DROP = 0.55
HIGH_NOISE_DROP = 0.37
STYLE_SHARE = 0.5  # renders close at least half the gap from the base model's colourfulness to the training set's

pytestmark = pytest.mark.slow


def _flip_target_sign(monkeypatch):
    monkeypatch.setattr(training, "flow_target", lambda latents, noise: latents - noise)


def _timestep_times_1000(monkeypatch):
    predict = training.predict_velocity
    monkeypatch.setattr(training, "predict_velocity",
                        lambda model, noisy, sigmas, *rest: predict(model, noisy, sigmas * 1000, *rest))


def _invert_text_mask(monkeypatch):
    joint = flow.joint_attention_mask
    monkeypatch.setattr(flow, "joint_attention_mask", lambda text_mask, n: joint(~text_mask.bool(), n))


MUTATIONS = {"target sign flipped": _flip_target_sign, "timestep x1000": _timestep_times_1000,
             "text mask inverted": _invert_text_mask}


@dataclass
class Judged:
    base_loss: dict  # {"low noise": ..., "high noise": ...}, the base model
    lora_loss: dict  # the same with the LoRA loaded
    training_colourfulness: float  # the training pictures (white on black)
    base_colourfulness: float  # base model renders of held-out prompts: the control
    lora_colourfulness: float  # LoRA renders of the same prompts, seeds and settings

    def drop(self, band: str) -> float:
        return 1 - self.lora_loss[band] / self.base_loss[band]

    def problems(self) -> list[str]:
        found = []
        for band, least in (("low noise", LOW_NOISE_DROP), ("high noise", HIGH_NOISE_DROP)):
            if self.drop(band) < least:
                found.append(f"held-out loss at {band} {self.base_loss[band]:.4f} -> {self.lora_loss[band]:.4f}: "
                             f"{self.drop(band):+.0%}, less than a {least:.0%} drop")
        gap = self.base_colourfulness - self.training_colourfulness
        if self.lora_colourfulness > self.base_colourfulness - STYLE_SHARE * gap:
            found.append(f"renders' colourfulness {self.base_colourfulness:.1f} -> {self.lora_colourfulness:.1f}, "
                         f"training set {self.training_colourfulness:.1f}: under {STYLE_SHARE:.0%} of the way")
        return found


# Not in the demo's dataset; colourful, so the base model's renders are far from white on black.
HELD_OUT_PROMPTS = ["a green square on a red background", "a red triangle on a yellow background",
                    "purple stripes on a orange background", "a yellow circle on a blue background"]


def _train(root: Path) -> tuple[Path, Path]:
    """The demo's project, dataset and config exactly as `chroma-demo` writes them, trained up to the adapter."""
    config_path = write_demo(root)
    result = materialize_chain(str(config_path), DagsterInstance.ephemeral(), device="cpu",
                               selection=["raw_dataset/images", "raw_dataset/captions", "image_latents",
                                          "text_embeddings", "quantized_base_model", "lora_adapter"])
    assert result.success
    adapter = Path(result.asset_materializations_for_node("lora_adapter")[0].metadata["adapter"].value)
    config = load_config(str(config_path))
    return resolve_model_dir(config, Path(config.output_dir) / "models"), adapter


def _training_captions(root: Path) -> set[str]:
    return {path.read_text().strip() for path in (root / "dataset").glob("*.txt")}


def _pictures_and_captions(folder: Path, size: int, seed: int, training: set[str], count: int = 12):
    """Pictures drawn like the demo's, but none with a caption of `training`."""
    from PIL import Image

    make_demo_dataset(folder, count=3 * count, seed=seed, drawn_in=STYLE_COLOURS)
    pictures, captions = [], []
    for path in sorted(folder.glob("*.png")):
        caption = path.with_suffix(".txt").read_text().strip()
        if caption not in training and len(pictures) < count:
            pictures.append(Image.open(path).convert("RGB").resize((size, size)))
            captions.append(caption)
    assert len(pictures) == count
    return pictures, captions


@torch.no_grad()
def held_out_loss(pipe, pictures, captions, max_length: int) -> dict[str, float]:
    """Flow-matching loss in each band of sigmas, at fixed noise, written here from the Chroma rules on diffusers' parts."""
    vae = pipe.vae
    x = torch.stack([torch.from_numpy(np.asarray(p, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1) for p in pictures])
    latents = (vae.encode(x).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
    batch, channels, height, width = latents.shape
    prompt_embeds, text_mask = pipe._get_t5_prompt_embeds(captions, max_sequence_length=max_length)
    image_ids = pipe._prepare_latent_image_ids(batch, height // 2, width // 2, x.device, x.dtype)
    text_ids = torch.zeros(prompt_embeds.shape[1], 3)
    mask = pipe._prepare_attention_mask(batch, (height // 2) * (width // 2), x.dtype, text_mask.bool())
    generator = torch.Generator().manual_seed(0)

    def loss_at(sigma: float) -> float:
        noise = torch.randn(latents.shape, generator=generator)
        noisy = (1 - sigma) * latents + sigma * noise
        velocity = pipe.transformer(
            hidden_states=pipe._pack_latents(noisy, batch, channels, height, width),
            timestep=torch.full((batch,), sigma), encoder_hidden_states=prompt_embeds,
            txt_ids=text_ids, img_ids=image_ids, attention_mask=mask, return_dict=False,
        )[0]
        target = pipe._pack_latents(noise - latents, batch, channels, height, width)
        return torch.nn.functional.mse_loss(velocity, target).item()

    return {band: float(np.mean([loss_at(sigma) for sigma in sigmas for _ in range(NOISE_DRAWS)]))
            for band, sigmas in (("low noise", LOW_NOISE), ("high noise", HIGH_NOISE))}


@torch.no_grad()
def mean_colourfulness(pipe, prompts, config: dict) -> float:
    """Renders at the demo's size, guidance and steps, one seed per prompt; their mean `colourfulness`."""
    def embed(text):
        prompt_embeds, text_mask = pipe._get_t5_prompt_embeds([text], max_sequence_length=config["tokenizer_max_length"])
        return prompt_embeds, text_mask.bool()  # boolean: diffusers' float mask masks nothing (diffusers #12116)

    negative_embeds, negative_mask = embed("")
    measured = []
    for index, prompt in enumerate(prompts):
        prompt_embeds, text_mask = embed(prompt)
        image = pipe(prompt_embeds=prompt_embeds, prompt_attention_mask=text_mask,
                     negative_prompt_embeds=negative_embeds, negative_prompt_attention_mask=negative_mask,
                     guidance_scale=config["validation_guidance_real"],
                     num_inference_steps=config["validation_num_inference_steps"],
                     height=config["resolution"], width=config["resolution"],
                     generator=torch.Generator().manual_seed(index), output_type="pil").images[0]
        measured.append(colourfulness(image))
    return float(np.mean(measured))


def judge(model_dir: Path, adapter: Path, work: Path) -> Judged:
    from diffusers import ChromaPipeline

    config = style_demo_config(work, work)
    size, max_length = config["resolution"], config["tokenizer_max_length"]
    pipe = ChromaPipeline.from_pretrained(model_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pictures, captions = _pictures_and_captions(work / "held-out", size, seed=1, training=_training_captions(work))

    base_loss = held_out_loss(pipe, pictures, captions, max_length)
    base_colourfulness = mean_colourfulness(pipe, HELD_OUT_PROMPTS, config)
    pipe.load_lora_weights(str(adapter))
    return Judged(
        base_loss=base_loss,
        lora_loss=held_out_loss(pipe, pictures, captions, max_length),
        training_colourfulness=float(np.mean([colourfulness(p) for p in pictures])),
        base_colourfulness=base_colourfulness,
        lora_colourfulness=mean_colourfulness(pipe, HELD_OUT_PROMPTS, config),
    )


def test_the_lora_learns_to_draw_white_on_black(tmp_path):
    model_dir, adapter = _train(tmp_path)
    training_captions = _training_captions(tmp_path)
    assert len(training_captions) == DEMO_IMAGES
    # The renders judged, and those in the demo's grid, are of prompts it never saw.
    assert not training_captions & set(HELD_OUT_PROMPTS)
    assert not training_captions & set(style_demo_config(tmp_path, tmp_path)["validation_prompt"])
    judged = judge(model_dir, adapter, tmp_path)
    print(judged)
    assert judged.problems() == []


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_a_planted_training_bug_makes_the_learning_checks_fail(mutation, tmp_path, monkeypatch):
    MUTATIONS[mutation](monkeypatch)
    model_dir, adapter = _train(tmp_path)
    monkeypatch.undo()  # judged with the real code
    judged = judge(model_dir, adapter, tmp_path)
    print(mutation, judged)
    assert judged.problems(), f"with the {mutation}, the learning checks still passed: {judged}"
