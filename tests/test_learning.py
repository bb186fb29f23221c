"""Training learns, measured from outside: the tests fail if the LoRA stops learning.

A LoRA is trained through the pipeline (Dagster, the demo's settings, the `toy` Chroma that
draws) on a dataset where two pictures in three carry the "ember" duotone and say "in ember
style", and the third are plain. Then it is judged only with diffusers' own ChromaPipeline
(its VAE, its T5 masking, its packing, its sampler), never with our flow.py, so a bug in our
training math cannot hide itself in the measurement:

- held-out loss: pictures and captions the LoRA never saw, at fixed sigmas and fixed noise,
  the flow-matching loss falls by a stated fraction against the base model;
- the style in pictures: renders of held-out prompts with the trigger move from the base
  model's colours toward the duotone (`ember_distance`), and renders without it stay plain.

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
from chroma_pipeline.demo_data import make_demo_dataset, style_demo_config, write_demo
from chroma_pipeline.demo_style import TRIGGER, ember_distance, stylise_dataset
from chroma_pipeline.models import resolve_model_dir
from chroma_pipeline.config import load_config

SIGMAS = (0.3, 0.5, 0.7, 0.9)
# Measured on the demo's 120 steps (1 CPU thread): held-out loss 0.760 -> 0.619 (-18.5%); triggered
# renders 70.1 -> 38.9 from the duotone (45% of the way to the training set's 0.5); untriggered 94.9.
# Planted bugs: sign flipped 1.781 (+134%), renders 81.3; timestep x1000 0.742 (-2.4%), renders 21.4;
# text mask inverted 0.670 (-11.9%), triggered 93.8 and untriggered 90.9 renders alike.
HELD_OUT_LOSS_DROP = 0.15  # the LoRA's held-out loss is at least 15% under the base model's
STYLE_SHARE = 0.3  # triggered renders close at least 30% of the gap from base colours to the training set's
PLAIN_MARGIN = 15.0  # untriggered renders stay this much further from the duotone than triggered ones

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
    base_loss: float
    lora_loss: float
    training_distance: float  # the styled training pictures
    base_distance: float  # base model, prompts with the trigger
    lora_distance: float  # LoRA, prompts with the trigger
    lora_plain_distance: float  # LoRA, the same prompts without it

    def problems(self) -> list[str]:
        found = []
        if self.lora_loss > (1 - HELD_OUT_LOSS_DROP) * self.base_loss:
            found.append(f"held-out loss {self.base_loss:.4f} -> {self.lora_loss:.4f}, "
                         f"less than a {HELD_OUT_LOSS_DROP:.0%} drop")
        gap = self.base_distance - self.training_distance
        if self.lora_distance > self.base_distance - STYLE_SHARE * gap:
            found.append(f"triggered renders {self.base_distance:.1f} -> {self.lora_distance:.1f} from the duotone, "
                         f"training set {self.training_distance:.1f}: under {STYLE_SHARE:.0%} of the way")
        if self.lora_plain_distance < self.lora_distance + PLAIN_MARGIN:
            found.append(f"untriggered renders {self.lora_plain_distance:.1f} vs triggered {self.lora_distance:.1f}: "
                         "the style shows without its trigger")
        return found


HELD_OUT_PROMPTS = ["a green square on a white background", "a blue triangle on a yellow background",
                    "orange stripes on a purple background", "a white circle on a black background"]


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


def _pictures_and_captions(folder: Path, size: int, seed: int):
    from PIL import Image

    make_demo_dataset(folder, count=12, seed=seed)
    stylise_dataset(folder)
    pictures, captions = [], []
    for path in sorted(folder.glob("*.png")):
        pictures.append(Image.open(path).convert("RGB").resize((size, size)))
        captions.append(path.with_suffix(".txt").read_text().strip())
    return pictures, captions


@torch.no_grad()
def held_out_loss(pipe, pictures, captions, max_length: int) -> float:
    """Flow-matching loss at fixed sigmas and noise, written here from the Chroma rules, on diffusers' parts."""
    vae = pipe.vae
    x = torch.stack([torch.from_numpy(np.asarray(p, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1) for p in pictures])
    latents = (vae.encode(x).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
    batch, channels, height, width = latents.shape
    prompt_embeds, text_mask = pipe._get_t5_prompt_embeds(captions, max_sequence_length=max_length)
    image_ids = pipe._prepare_latent_image_ids(batch, height // 2, width // 2, x.device, x.dtype)
    text_ids = torch.zeros(prompt_embeds.shape[1], 3)
    mask = pipe._prepare_attention_mask(batch, (height // 2) * (width // 2), x.dtype, text_mask.bool())
    generator = torch.Generator().manual_seed(0)
    losses = []
    for sigma in SIGMAS:
        noise = torch.randn(latents.shape, generator=generator)
        noisy = (1 - sigma) * latents + sigma * noise
        velocity = pipe.transformer(
            hidden_states=pipe._pack_latents(noisy, batch, channels, height, width),
            timestep=torch.full((batch,), sigma), encoder_hidden_states=prompt_embeds,
            txt_ids=text_ids, img_ids=image_ids, attention_mask=mask, return_dict=False,
        )[0]
        target = pipe._pack_latents(noise - latents, batch, channels, height, width)
        losses.append(torch.nn.functional.mse_loss(velocity, target).item())
    return float(np.mean(losses))


@torch.no_grad()
def mean_render_distance(pipe, prompts, config: dict) -> float:
    """Renders at the demo's size, guidance and steps, one seed per prompt; their mean `ember_distance`."""
    def embed(text):
        prompt_embeds, text_mask = pipe._get_t5_prompt_embeds([text], max_sequence_length=config["tokenizer_max_length"])
        return prompt_embeds, text_mask.bool()  # boolean: diffusers' float mask masks nothing (diffusers #12116)

    negative_embeds, negative_mask = embed("")
    distances = []
    for index, prompt in enumerate(prompts):
        prompt_embeds, text_mask = embed(prompt)
        image = pipe(prompt_embeds=prompt_embeds, prompt_attention_mask=text_mask,
                     negative_prompt_embeds=negative_embeds, negative_prompt_attention_mask=negative_mask,
                     guidance_scale=config["validation_guidance_real"],
                     num_inference_steps=config["validation_num_inference_steps"],
                     height=config["resolution"], width=config["resolution"],
                     generator=torch.Generator().manual_seed(index), output_type="pil").images[0]
        distances.append(ember_distance(image))
    return float(np.mean(distances))


def judge(model_dir: Path, adapter: Path, work: Path) -> Judged:
    from diffusers import ChromaPipeline

    config = style_demo_config(work, work)
    size, max_length = config["resolution"], config["tokenizer_max_length"]
    pipe = ChromaPipeline.from_pretrained(model_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pictures, captions = _pictures_and_captions(work / "held-out", size, seed=1)
    styled = [p for p, c in zip(pictures, captions, strict=True) if TRIGGER in c]
    triggered = [f"{prompt}, {TRIGGER}" for prompt in HELD_OUT_PROMPTS]

    base_loss = held_out_loss(pipe, pictures, captions, max_length)
    base_distance = mean_render_distance(pipe, triggered, config)
    pipe.load_lora_weights(str(adapter))
    return Judged(
        base_loss=base_loss,
        lora_loss=held_out_loss(pipe, pictures, captions, max_length),
        training_distance=float(np.mean([ember_distance(p) for p in styled])),
        base_distance=base_distance,
        lora_distance=mean_render_distance(pipe, triggered, config),
        lora_plain_distance=mean_render_distance(pipe, HELD_OUT_PROMPTS, config),
    )


def test_the_lora_learns_the_style_and_only_where_the_caption_asks(tmp_path):
    model_dir, adapter = _train(tmp_path)
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
