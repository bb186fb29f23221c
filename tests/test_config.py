"""The config file: the quickstart's keys as written, clear errors, one warning for unknown keys."""

import json
import warnings

import pytest

from chroma_pipeline.config import ChromaConfig, ConfigError, config_from_dict, load_config

# The quickstart's own example, comments included; it must load unchanged.
QUICKSTART_SNIPPET = """\
// from the Chroma quickstart
{
  "model_type": "lora",
  "model_family": "chroma",
  "model_flavour": "base",
  "output_dir": "/workspace/chroma-output",
  "network_rank": 16,
  "learning_rate": 2.0e-4,
  "mixed_precision": "bf16",
  "gradient_checkpointing": true,   /* recommended */
  "pretrained_model_name_or_path": null
}
"""


def test_quickstart_snippet_loads_unchanged(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(QUICKSTART_SNIPPET)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning either: every key is known
        config = load_config(path)
    assert config.model_flavour == "base"
    assert config.model_source == "lodestones/Chroma1-Base"
    assert config.learning_rate == 2e-4
    assert config.lora_alpha_value == 16.0  # alpha defaults to the rank


@pytest.mark.parametrize(
    ("flavour", "repo"),
    [("base", "lodestones/Chroma1-Base"), ("hd", "lodestones/Chroma1-HD"), ("flash", "lodestones/Chroma1-Flash")],
)
def test_flavours_map_to_lodestones_repos(flavour, repo):
    assert ChromaConfig(model_flavour=flavour).model_source == repo


def test_explicit_model_path_overrides_flavour():
    config = ChromaConfig(model_flavour="hd", pretrained_model_name_or_path="/models/my-chroma")
    assert config.model_source == "/models/my-chroma"


def test_unknown_keys_give_one_warning_naming_them():
    with pytest.warns(UserWarning) as caught:
        config_from_dict({"network_rnak": 8, "learnin_rate": 1e-4})
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1
    assert "learnin_rate" in messages[0] and "network_rnak" in messages[0]


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("model_flavour", "turbo", "'base', 'hd', 'flash', 'tiny' or 'toy'"),
        ("model_family", "flux", "'chroma'"),
        ("network_rank", 0, "greater than or equal to 1"),
        ("learning_rate", -1e-4, "greater than 0"),
        ("learning_rate", "fast", "valid number"),
        ("base_model_precision", "int3-quanto", "int8-quanto"),
        ("flux_t5_padding", "left", "'unmodified' or 'zero'"),
    ],
)
def test_bad_values_name_key_value_and_what_is_allowed(key, value, expected):
    with pytest.raises(ConfigError) as error:
        config_from_dict({key: value}, source="my.json")
    message = str(error.value)
    assert "my.json" in message and key in message and repr(value) in message and expected in message


def test_every_bad_value_is_reported_at_once():
    with pytest.raises(ConfigError) as error:
        config_from_dict({"model_flavour": "turbo", "network_rank": 0})
    assert "model_flavour" in str(error.value) and "network_rank" in str(error.value)


def test_resolution_must_fit_the_64_pixel_grid():
    with pytest.raises(ConfigError, match="try 512"):
        config_from_dict({"resolution": 500})
    assert config_from_dict({"resolution": 1.0, "resolution_type": "area"}).validation_size == 1024


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    path = tmp_path / "sub" / "config.jsonc"
    path.parent.mkdir()
    path.write_text('{"instance_data_dir": "images", "output_dir": "out"}')
    config = load_config(path)
    assert config.instance_data_dir == str(path.parent / "images")
    assert config.output_dir == str(path.parent / "out")


def test_simpletuner_flag_style_keys_are_accepted(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"--model_family": "chroma", "--model_flavour": "hd", "--network_rank": 8}')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = load_config(path)
    assert (config.model_flavour, config.network_rank) == ("hd", 8)


def test_default_paths_are_relative_to_the_config_file_too(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{}")
    config = load_config(path)
    assert config.output_dir == str(tmp_path / "chroma-output")
    assert config.instance_data_dir == str(tmp_path / "datasets" / "chroma")


def test_missing_or_broken_file_says_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"network_rank": 16,,}')
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(broken)


def test_settings_hash_changes_only_with_the_named_settings():
    base = ChromaConfig()
    assert base.settings_hash("learning_rate") == ChromaConfig(network_rank=4).settings_hash("learning_rate")
    assert base.settings_hash("learning_rate") != ChromaConfig(learning_rate=3e-4).settings_hash("learning_rate")


def test_an_output_folder_inside_the_dataset_is_refused(tmp_path):
    # The pipeline's own files would look like dataset edits every night, and grid PNGs like training images.
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"instance_data_dir": "data", "output_dir": "data/output"}))
    with pytest.raises(ConfigError, match="`output_dir`.*is inside `instance_data_dir`"):
        load_config(config)


def test_machines_are_numbered_from_zero_to_num_machines_minus_one():
    assert config_from_dict({"num_machines": 2, "machine_rank": 1}).machine_rank == 1
    with pytest.raises(ConfigError, match="`machine_rank` = 2 with `num_machines` = 2: machines are numbered 0 to 1"):
        config_from_dict({"num_machines": 2, "machine_rank": 2})


def test_a_multi_machine_launch_names_this_machine_and_where_the_others_meet(tmp_path):
    from chroma_pipeline.launch import launch_command

    config = config_from_dict({"num_processes": 4, "num_machines": 2, "main_process_ip": "10.0.0.5",
                               "main_process_port": 29600})
    command = launch_command("cfg.jsonc", config, "cuda", machine_rank=1)
    options = command[command.index("--multi_gpu") + 1 : command.index("chroma_pipeline.train") - 1]
    flags = dict(zip(options[::2], options[1::2], strict=True))
    # accelerate counts the processes of all machines; ours counts one machine's.
    assert flags["--num_processes"] == "8" and flags["--num_machines"] == "2" and flags["--machine_rank"] == "1"
    assert flags["--main_process_ip"] == "10.0.0.5" and flags["--main_process_port"] == "29600"
    assert command[-7:] == ["-m", "chroma_pipeline.train", "--config", "cfg.jsonc", "--only-train", "--device", "cuda"]


def test_a_setting_added_later_changes_no_key_at_its_default():
    """num_machines joined the adapter's key after adapters existed: at 1 it must leave every key as it was."""
    from chroma_pipeline.training import TRAINING_SETTINGS

    config = config_from_dict({})
    before = [key for key in TRAINING_SETTINGS if key != "num_machines"]
    assert config.settings_hash(*TRAINING_SETTINGS) == config.settings_hash(*before)
    assert config_from_dict({"num_machines": 2}).settings_hash(*TRAINING_SETTINGS) != config.settings_hash(*before)
