"""SimpleTuner users switch without rewriting a file: config.json, multidatabackend.json, prompt library.

`tests/simpletuner_examples/` holds SimpleTuner's published example files, unchanged.
"""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance
from safetensors import safe_open

from chroma_pipeline import simpletuner
from chroma_pipeline.config import ConfigError, config_from_dict, load_config
from chroma_pipeline.demo_data import make_demo_dataset
from chroma_pipeline.tiny import build_tiny_chroma

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "tests" / "simpletuner_examples"
CONFIGS = ["chroma.peft-lora.config.json", "flux.peft-lora.config.json", "flux.peft-lora.config.old.json"]
DATALOADERS = ["multidatabackend-small-dreambooth-512px.json", "multidatabackend.json.example", "dataloader-md-basic.json",
               "anima.peft-lora.multidatabackend.json"]


def read(name: str):
    from chroma_pipeline.storage import parse_jsonc

    return parse_jsonc((EXAMPLES / name).read_text())


@pytest.mark.parametrize("name", CONFIGS)
def test_every_key_of_simpletuners_example_configs_is_classified(name):
    unclassified = [key for key in read(name) if key.removeprefix("--") not in simpletuner.CONFIG_RULES]
    assert unclassified == []


@pytest.mark.parametrize("name", DATALOADERS)
def test_every_key_of_simpletuners_dataloader_examples_is_classified(name):
    keys = {key for entry in read(name) for key in entry}
    unclassified = [k for k in keys if k not in simpletuner.DATASET_RULES and not k.startswith(simpletuner.AWS_PREFIX)]
    assert unclassified == []


def test_the_readme_table_is_the_code_table():
    assert simpletuner.key_table() in (REPO / "README.md").read_text()


def test_max_upscale_threshold_is_the_share_of_growth_and_null_lifts_the_limit():
    assert config_from_dict({}).maximum_upscale == 2.0  # ours; SimpleTuner's default is no limit
    with pytest.warns(UserWarning, match="`max_upscale_threshold` = 0.2 -> `maximum_upscale` = 1.2"):
        assert config_from_dict({"max_upscale_threshold": 0.2}).maximum_upscale == 1.2
    with pytest.warns(UserWarning, match="`max_upscale_threshold` = None -> `maximum_upscale` = None"):
        assert config_from_dict({"max_upscale_threshold": None}).maximum_upscale is None
    assert config_from_dict({"maximum_upscale": None}).maximum_upscale is None


def test_the_chroma_example_keeps_its_meaning():
    values = read("chroma.peft-lora.config.json")
    del values["data_backend_config"]
    with pytest.warns(UserWarning) as caught:
        config = config_from_dict(values)
    assert config.network_rank == 16 and config.lora_alpha_value == 16  # lora_rank, not our default
    assert config.optimizer == "adamw" and config.num_train_epochs is None and config.max_train_steps == 100
    assert config.validation_size == 1024 and config.validation_guidance_real == 4.0
    assert config.checkpointing_steps == 10 and config.offload_during_startup  # quantize_via: cpu
    assert config.grad_clip_method == "value" and config.flow_schedule_shift == 3
    assert config.validation_negative_prompt == values["validation_negative_prompt"]
    assert "🟫" in config.validation_prompts[0]
    messages = [str(w.message) for w in caught]
    # One note for the renamed keys (the optimizer mapping logged), one for everything set aside.
    assert any("`optimizer` = 'adamw_bf16' -> `optimizer` = 'adamw'" in m for m in messages)
    set_aside = next(m for m in messages if "no effect here" in m)
    assert "`push_to_hub`" in set_aside and "`report_to`" in set_aside and "nothing is uploaded" in set_aside
    assert not any("unknown keys" in m for m in messages)


@pytest.mark.parametrize(("key", "value", "advice"), [
    ("lora_type", "lycoris", "lora_type 'standard'"),
    ("use_ema", True, "EMA is not offered"),
    ("fuse_qkv_projections", True, "separate q, k, v"),
    ("optimizer", "prodigy", "use `adamw`"),
    ("validation_resolution", "1024x768", "square"),
    ("flux_fast_schedule", True, "Chroma's own sigma sampling"),
    ("validation_prompt_library", True, "user_prompt_library"),
    ("delete_unwanted_images", True, "never deleted"),
])
def test_a_key_that_would_change_the_result_is_refused_with_what_to_use(key, value, advice):
    with pytest.raises(ConfigError, match=f"`{key}`.*{advice}"):
        config_from_dict({key: value})


def test_the_same_keys_set_to_values_that_change_nothing_are_accepted():
    with pytest.warns(UserWarning, match="no effect here"):
        config = config_from_dict({"use_ema": False, "lora_type": "standard", "fuse_qkv_projections": False,
                                   "validation_resolution": "512", "resume_from_checkpoint": "latest"})
    assert config.validation_size == 512


def test_our_own_name_wins_over_simpletuners_alias_and_says_so():
    with pytest.warns(UserWarning, match="`lora_rank` = 4 set aside: `network_rank` = 8 is also set"):
        assert config_from_dict({"lora_rank": 4, "network_rank": 8}).network_rank == 8


@pytest.mark.parametrize("library", [
    {"cat": "a cat", "dog": {"prompt": "a dog", "adapter_strength": 1.0}},  # SimpleTuner's two value shapes
    ["a cat", "a dog"],
])
def test_user_prompt_library_in_each_shape_simpletuner_writes(tmp_path, library):
    path = tmp_path / "library.json"
    path.write_text(json.dumps(library))
    config = config_from_dict({"validation_prompt": "a bird", "user_prompt_library": str(path)})
    assert config.validation_prompts == ["a bird", "a cat", "a dog"]


def test_chromas_presets_are_simpletuners():
    from chroma_pipeline.lora import target_modules

    reached = lambda preset: {name for name in MODULES if __import__("re").fullmatch(target_modules(preset, 2), name)}  # noqa: E731
    # SimpleTuner's Chroma `tiny`: attention and the first feed-forward projection, every block.
    assert reached("tiny") == {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                               "transformer_blocks.0.attn.to_v", "transformer_blocks.0.attn.to_out.0",
                               "transformer_blocks.0.ff.net.0.proj", "single_transformer_blocks.0.attn.to_q",
                               "single_transformer_blocks.0.attn.to_k", "single_transformer_blocks.0.attn.to_v"}
    assert reached("tiny+embedder") == reached("tiny") | {"x_embedder"}
    # Its Chroma code has no `nano`: SimpleTuner trains its default q, k, v, out targets instead.
    assert reached("nano") == reached("tiny") - {"transformer_blocks.0.ff.net.0.proj"}
    assert "proj_out" not in reached("all+ffs")  # the final output layer stays out (kept in full precision too)
    # A list is matched as PEFT matches SimpleTuner's `peft_lora_target_modules`: by name or by its end.
    assert reached(["to_q"]) == {"transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_q"}
    assert reached(["proj_out"]) == {"proj_out", "single_transformer_blocks.0.proj_out"}


MODULES = ["x_embedder", "context_embedder", "proj_out", "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
           "transformer_blocks.0.attn.to_v", "transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.attn.add_q_proj",
           "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2", "single_transformer_blocks.0.proj_mlp",
           "single_transformer_blocks.0.proj_out", "single_transformer_blocks.0.attn.to_q",
           "single_transformer_blocks.0.attn.to_k", "single_transformer_blocks.0.attn.to_v"]


def test_flow_schedule_shift_is_applied_before_chromas_tail_remap():
    import torch

    from chroma_pipeline.flow import sample_sigmas, shift_sigmas, tail_remap

    draw = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    logit_normal = torch.sigmoid(torch.randn(1000, generator=draw()))
    assert torch.allclose(sample_sigmas(1000, draw(), shift=3.0), tail_remap(3 * logit_normal / (1 + 2 * logit_normal)))
    assert torch.equal(sample_sigmas(1000, draw()), tail_remap(logit_normal))  # default: no shift
    assert sample_sigmas(1000, draw(), shift=3.0).mean() > sample_sigmas(1000, draw()).mean()  # toward noise
    assert torch.equal(shift_sigmas(logit_normal, 0), logit_normal)  # SimpleTuner's 0 = off


# --- the whole family of files, as a user brings them --------------------------------------
def simpletuner_tree(root: Path, model_dir: Path) -> Path:
    """SimpleTuner's layout: config/config.json and config/multidatabackend.json, datasets/ beside
    them, relative paths read from the working directory. The Chroma example is changed in the two
    keys the user must change: the model (a local tiny Chroma) and the dataloader file."""
    make_demo_dataset(root / "datasets" / "small", count=6)
    make_demo_dataset(root / "datasets" / "large", count=4, seed=1)
    (root / "config").mkdir()
    config = read("chroma.peft-lora.config.json")
    config.update(pretrained_model_name_or_path=str(model_dir), data_backend_config="config/multidatabackend.json")
    (root / "config" / "config.json").write_text(json.dumps(config, indent=4))  # json.dump escapes the emoji
    backend = [
        {"id": "small", "type": "local", "instance_data_dir": "datasets/small", "resolution": 64,
         "resolution_type": "pixel_area", "caption_strategy": "textfile", "repeats": 2, "crop": True,
         "crop_style": "center", "crop_aspect": "preserve", "cache_dir_vae": "cache/vae/{model_family}/small"},
        {"id": "large", "type": "local", "instance_data_dir": "datasets/large", "resolution": 128,
         "resolution_type": "pixel_area", "caption_strategy": "instanceprompt", "instance_prompt": "a toy shape",
         "minimum_image_size": 64, "cache_dir_vae": "cache/vae/{model_family}/large"},
        {"id": "text-embeds", "dataset_type": "text_embeds", "default": True, "type": "local",
         "cache_dir": "cache/text/{model_family}"},
    ]
    (root / "config" / "multidatabackend.json").write_text(json.dumps(backend, indent=2))
    return root / "config" / "config.json"


@pytest.fixture(scope="module")
def tiny_chroma(tmp_path_factory) -> Path:
    return build_tiny_chroma(tmp_path_factory.mktemp("models") / "tiny-chroma")


def test_two_datasets_keep_their_own_settings(tmp_path, tiny_chroma, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(simpletuner_tree(tmp_path, tiny_chroma))
    small, large = config.image_datasets
    assert (small.id, large.id) == ("small", "large")
    assert small.root == tmp_path / "datasets" / "small"  # read from the working directory, as SimpleTuner does
    assert large.setting("crop", config) is False  # SimpleTuner's default for an entry that leaves it out
    assert large.setting("resolution", config) == 128 and small.setting("repeats", config) == 2


def adapter_rank_and_alpha(weights: Path) -> tuple[int, float]:
    with safe_open(str(weights), "pt") as handle:
        rank = next(handle.get_tensor(k).shape[0] for k in handle.keys() if k.endswith("lora_A.weight"))
        header = json.loads(handle.metadata()["lora_adapter_metadata"])
    return rank, float(header["transformer.lora_alpha"])


@pytest.mark.slow
def test_simpletuners_chroma_example_trains_through_dagster(tmp_path, tiny_chroma):
    config_path = simpletuner_tree(tmp_path, tiny_chroma)
    env = {**os.environ, "CHROMA_CONFIG": str(config_path), "CHROMA_DEVICE": "cpu", "DAGSTER_HOME": str(tmp_path / "home")}
    (tmp_path / "home").mkdir()
    run = subprocess.run([sys.executable, "-m", "dagster", "asset", "materialize", "-m", "assets.definitions",
                          "--select", "*"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    instance = DagsterInstance.from_config(str(tmp_path / "home"))

    def metadata(asset: str) -> dict:
        record = instance.get_latest_materialization_event(AssetKey.from_user_string(asset))
        return {k: v.value for k, v in record.asset_materialization.metadata.items()}

    scan = metadata("raw_dataset/images")
    assert "| small |" in scan["datasets"] and "| large |" in scan["datasets"]
    assert "| 64x64 |" in scan["buckets: small"] and "| 128x128 |" in scan["buckets: large"]  # each its own buckets
    adapter = metadata("lora_adapter")
    assert json.loads(json.dumps(adapter["samples per epoch"])) == {"small": 6 * 3, "large": 4}  # repeats 2: 3 times
    assert adapter["steps"] == 100  # num_train_epochs 0: max_train_steps
    assert adapter_rank_and_alpha(Path(adapter["adapter"])) == (16, 16.0)
    assert Path(metadata("validation_grid")["grid path"]).is_file()


@pytest.mark.slow
def test_simpletuners_chroma_example_trains_through_the_cli(tmp_path, tiny_chroma):
    config_path = simpletuner_tree(tmp_path, tiny_chroma)
    run = subprocess.run([sys.executable, "-m", "chroma_pipeline.train", "--config", "config/config.json", "--device", "cpu"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "samples per epoch (with repeats): large 4, small 18" in run.stdout
    weights = next((config_path.parent / "output").rglob("lora/*/pytorch_lora_weights.safetensors"))
    assert adapter_rank_and_alpha(weights) == (16, 16.0)


def test_a_dataloader_entry_simpletuner_cannot_read_here_is_refused_by_name(tmp_path):
    (tmp_path / "multidatabackend.json").write_text(json.dumps([
        {"id": "remote", "type": "aws", "aws_bucket_name": "b"},
        {"id": "text", "dataset_type": "text_embeds", "default": True, "type": "local", "cache_dir": "x"},
    ]))
    (tmp_path / "config.json").write_text(json.dumps({"data_backend_config": "multidatabackend.json"}))
    with pytest.raises(ConfigError, match="dataset 'remote'.*`type`.*local folder"):
        load_config(tmp_path / "config.json")


def test_simpletuners_documentation_example_is_refused_for_its_placeholders(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"data_backend_config": str(EXAMPLES / DATALOADERS[1])}))
    with pytest.raises(ConfigError, match="crop_style"):
        load_config(tmp_path / "config.json")


def test_the_quickstart_snippet_with_a_dataloader_file_needs_no_other_key(tmp_path):
    make_demo_dataset(tmp_path / "photos", count=3)
    (tmp_path / "multidatabackend.json").write_text(json.dumps([
        {"id": "photos", "type": "local", "instance_data_dir": "photos", "caption_strategy": "filename"}]))
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "lora", "model_family": "chroma", "model_flavour": "base", "output_dir": "out",
        "network_rank": 16, "learning_rate": 2.0e-4, "mixed_precision": "bf16", "gradient_checkpointing": True,
        "pretrained_model_name_or_path": None, "data_backend_config": "multidatabackend.json"}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = load_config(tmp_path / "config.json")
    assert [d.id for d in config.image_datasets] == ["photos"] and config.network_rank == 16


def test_a_config_json_with_flag_style_keys_and_a_trailing_comma_loads(tmp_path):
    text = (EXAMPLES / "chroma.peft-lora.config.json").read_text().replace('"lora_rank"', '"--lora_rank"')
    text = text.replace('"validation_steps": 50\n}', '"validation_steps": 50,\n}')
    text = text.replace('"config/examples/multidatabackend-small-dreambooth-512px.json"', "null")
    assert '"--lora_rank"' in text and '50,\n}' in text
    (tmp_path / "config.json").write_text(text)
    with pytest.warns(UserWarning):
        config = load_config(tmp_path / "config.json")
    assert config.network_rank == 16 and config.validation_steps == 50


@pytest.mark.slow
def test_the_quickstarts_snippet_trains_with_a_dataloader_file(tmp_path, tiny_chroma):
    """The quickstart's config as written, plus the two keys that point at the user's files."""
    simpletuner_tree(tmp_path, tiny_chroma)
    (tmp_path / "config" / "quickstart.jsonc").write_text(f"""\
{{
  "model_type": "lora",
  "model_family": "chroma",
  "model_flavour": "base",
  "output_dir": "quickstart-output",
  "network_rank": 16,
  "learning_rate": 2.0e-4,
  "mixed_precision": "bf16",
  "gradient_checkpointing": true,
  "pretrained_model_name_or_path": "{tiny_chroma}",
  "data_backend_config": "config/multidatabackend.json"
}}
""")
    run = subprocess.run([sys.executable, "-m", "chroma_pipeline.train", "--config", "config/quickstart.jsonc",
                          "--device", "cpu"], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    weights = next((tmp_path / "config" / "quickstart-output").rglob("lora/*/pytorch_lora_weights.safetensors"))
    assert adapter_rank_and_alpha(weights) == (16, 16.0)
    assert "samples per epoch (with repeats): large 4, small 18" in run.stdout


def test_peft_lora_target_modules_replace_the_preset(tmp_path):
    assert config_from_dict({"peft_lora_target_modules": ["to_q", "to_v"]}).flux_lora_target == ["to_q", "to_v"]
    listed = tmp_path / "targets.json"
    listed.write_text('["attn.to_k"]')
    assert config_from_dict({"peft_lora_target_modules": str(listed)}).flux_lora_target == ["attn.to_k"]


def test_prompt_library_keys_other_than_the_prompt_are_named_as_ignored(tmp_path):
    path = tmp_path / "library.json"
    path.write_text(json.dumps({"cat": {"prompt": "a cat", "negative_prompt": "dogs"}}))
    with pytest.warns(UserWarning, match="negative_prompt ignored"):
        assert config_from_dict({"validation_prompt": None, "user_prompt_library": str(path)}).validation_prompts == ["a cat"]
