"""The offline toy flavour: trained weights shipped in the package, checked before use, drawing what it is asked."""

import os
import random
import shutil

import pytest
import torch

from chroma_pipeline import models, toy
from chroma_pipeline.config import ChromaConfig
from chroma_pipeline.demo_data import draw_picture
from chroma_pipeline.toy_metrics import picture_colours, psnr
from chroma_pipeline.toy_training import to_images, to_pixels


@pytest.fixture(scope="module")
def toy_model_dir(tmp_path_factory):
    return models.resolve_model_dir(ChromaConfig(model_flavour="toy"), tmp_path_factory.mktemp("models"))


def test_builds_from_the_committed_files_and_loads_offline(toy_model_dir):
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # conftest: nothing may come from the network
    for name in toy.WEIGHT_SHA256:  # copied as committed, not re-saved
        assert (toy_model_dir / name).read_bytes() == (toy.TOY_WEIGHTS / name).read_bytes()
    transformer = models.load_transformer(toy_model_dir, torch.float32)
    vae = models.load_vae(toy_model_dir, torch.float32)
    encoder = models.load_text_encoder(toy_model_dir, torch.float32)
    tokenizer = models.load_tokenizer(toy_model_dir)
    assert type(transformer).__name__ == "ChromaTransformer2DModel"
    assert vae.config.latent_channels == 16 and len(vae.config.block_out_channels) == 4  # 8x, like Flux's VAE
    assert encoder.config.d_model == transformer.config.joint_attention_dim
    assert tokenizer("a red circle").input_ids[-1] == tokenizer.eos_token_id


def test_a_damaged_weight_file_is_refused_naming_it(tmp_path):
    weights = tmp_path / "toy_weights"
    shutil.copytree(toy.TOY_WEIGHTS, weights)
    damaged = weights / "transformer" / "diffusion_pytorch_model.safetensors"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x01
    damaged.write_bytes(bytes(data))
    with pytest.raises(toy.ToyWeightsError) as error:
        toy.build_toy_chroma(tmp_path / "model", weights_dir=weights)
    assert str(damaged) in str(error.value) and "toy_training" in str(error.value)
    assert not (tmp_path / "model").exists()  # nothing half-built is left to be reused

    damaged.unlink()
    with pytest.raises(toy.ToyWeightsError, match="missing"):
        toy.build_toy_chroma(tmp_path / "model", weights_dir=weights)


def test_the_vae_round_trips_a_picture(toy_model_dir):
    vae = models.load_vae(toy_model_dir, torch.float32)
    picture, _ = draw_picture(random.Random(7), 64, "yellow", "circle", "purple", gradient=0)
    with torch.no_grad():
        reconstruction = to_images(vae.decode(vae.encode(to_pixels([picture])).latent_dist.mode()).sample)[0]
    assert psnr(picture, reconstruction) >= 20


def test_a_prompt_is_drawn_in_its_colours(toy_model_dir):
    from diffusers import ChromaPipeline

    pipe = ChromaPipeline.from_pretrained(toy_model_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle on a blue background", height=toy.TOY_RESOLUTION, width=toy.TOY_RESOLUTION,
                 num_inference_steps=8, guidance_scale=toy.TOY_GUIDANCE, generator=torch.Generator().manual_seed(0),
                 max_sequence_length=32).images[0]
    assert picture_colours(image) == ("red", "blue")
