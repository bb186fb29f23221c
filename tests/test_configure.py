"""`chroma-pipeline configure`: the config wizard (SimpleTuner's `simpletuner configure`).

It asks the quickstart's questions (or takes flags), proposes a base_model_precision from the
memory estimate on the detected device, and writes a commented JSONC config that loads as is.
"""

import json
import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import json5
import pytest
from dagster import DagsterInstance
from safetensors import safe_open

from chroma_pipeline import configure
from chroma_pipeline.config import ChromaConfig, config_from_dict, load_config
from chroma_pipeline.demo_data import demo_config, make_demo_dataset
from chroma_pipeline.device import DeviceInfo
from chroma_pipeline.memory import AUTO_ORDER, choose_precision

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30


def load_quietly(path: Path) -> ChromaConfig:
    """load_config, failing on any warning (an unknown key, a key with no effect)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return load_config(path)


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """An empty project folder (the current folder) holding an 8-image demo dataset in dataset/."""
    make_demo_dataset(tmp_path / "dataset", count=8)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def answers(monkeypatch, *replies: str) -> list[str]:
    """Feed `input()` these replies in order; returns the questions it was asked."""
    asked, queue = [], list(replies)

    def fake_input(prompt=""):
        asked.append(prompt)
        if not queue:
            raise EOFError
        return queue.pop(0)

    monkeypatch.setattr("builtins.input", fake_input)
    return asked


def fake_gpu(monkeypatch, free_gib: float) -> DeviceInfo:
    """A CUDA device with `free_gib` GiB free, as detect_device would report it."""
    monkeypatch.setattr(DeviceInfo, "free_memory_bytes", lambda self: int(free_gib * GIB))
    monkeypatch.setattr(DeviceInfo, "supports_bf16", property(lambda self: True))
    device = DeviceInfo("cuda", f"Fake GPU ({free_gib} GiB)", "cuda:0")
    monkeypatch.setattr(configure, "detect_device", lambda: device)
    return device


# --- non-interactive ---------------------------------------------------------------------------
@pytest.mark.slow
def test_flags_write_a_config_that_trains_the_tiny_chain_at_the_rank_asked(project):
    from assets.definitions import materialize_chain

    rc = configure.main(["--yes", "--flavour", "tiny", "--dataset", "dataset", "--output-dir", "output", "--rank", "4",
                         "--steps", "4", "--resolution", "128", "--prompt", "a red circle", "--config", "config.jsonc"])
    assert rc == 0
    config = load_quietly(project / "config.jsonc")
    assert (config.model_flavour, config.network_rank, config.max_train_steps, config.resolution) == ("tiny", 4, 4, 128)
    assert config.instance_data_dir == str(project / "dataset")  # written relative, read back absolute
    assert config.tokenizer_max_length == 64  # the demo's settings for the tiny flavour

    result = materialize_chain(str(project / "config.jsonc"), DagsterInstance.ephemeral(), device="cpu")
    assert result.success
    grid = result.asset_materializations_for_node("validation_grid")[0].metadata["grid path"].value
    assert Path(grid).is_file()
    adapter = Path(result.asset_materializations_for_node("lora_adapter")[0].metadata["adapter"].value)
    with safe_open(str(adapter), "pt") as tensors:
        lora_a = [name for name in tensors.keys() if name.endswith("lora_A.weight")]
        assert lora_a and all(tensors.get_slice(name).get_shape()[0] == 4 for name in lora_a)


def test_the_file_is_commented_jsonc_with_simpletuners_keys_and_paths_relative_to_it(project):
    assert configure.main(["--yes", "--flavour", "tiny", "--dataset", "dataset", "--output-dir", "output"]) == 0
    text = (project / "config.jsonc").read_text()
    lines = text.splitlines()
    keys = [i for i, line in enumerate(lines) if line.startswith('  "')]
    assert keys and all(lines[i - 1].startswith("  // ") for i in keys)  # a comment above every key
    assert "// LoRA rank" in text and "// the pipeline's guidance_scale" in text
    values = json5.loads(text)
    assert values["model_type"] == "lora" and values["model_family"] == "chroma"
    assert values["instance_data_dir"] == "dataset" and values["output_dir"] == "output"
    assert values["network_rank"] == 16 and values["validation_guidance_real"] == 1.0
    assert values["base_model_precision"] in configure.PRECISIONS
    assert load_quietly(project / "config.jsonc").model_flavour == "tiny"


def test_a_path_outside_the_configs_folder_is_written_absolute(project):
    (project / "configs").mkdir()
    assert configure.main(["--yes", "--flavour", "tiny", "--dataset", "dataset", "--output-dir", "configs/out",
                           "--config", "configs/mine.jsonc"]) == 0
    values = json5.loads((project / "configs" / "mine.jsonc").read_text())
    assert values["instance_data_dir"] == str(project / "dataset")
    assert values["output_dir"] == "out"
    assert load_quietly(project / "configs" / "mine.jsonc").output_dir == str(project / "configs" / "out")


def test_a_missing_dataset_folder_is_refused_without_writing(project, capsys):
    assert configure.main(["--yes", "--flavour", "tiny", "--dataset", "no-such-folder"]) == 2
    assert "--dataset 'no-such-folder': no such folder" in capsys.readouterr().err
    assert not (project / "config.jsonc").exists()


def test_a_bad_flag_value_names_the_flag_and_a_fix(project, capsys):
    assert configure.main(["--yes", "--flavour", "tiny", "--dataset", "dataset", "--resolution", "100"]) == 2
    assert "--resolution '100': must be a multiple of 64 pixels (try 128)" in capsys.readouterr().err
    assert configure.main(["--yes", "--flavour", "turbo"]) == 2
    assert "--flavour 'turbo': choose one of base, hd, flash, tiny" in capsys.readouterr().err
    assert configure.main(["--yes", "--flavour", "tiny", "--dataset", "dataset", "--output-dir", "dataset/out"]) == 2
    assert "inside the dataset folder" in capsys.readouterr().err
    assert not (project / "config.jsonc").exists()


# --- interactive -------------------------------------------------------------------------------
def test_answers_typed_one_at_a_time_end_up_in_the_file(project, monkeypatch):
    asked = answers(monkeypatch, "tiny", "dataset", "runs/one", "32", "250", "a red circle | blue stripes", "192",
                    "int8-quanto", "n")
    assert configure.main([]) == 0
    assert [q.split(" [")[0] for q in asked] == [
        "Model flavour (base | hd | flash | tiny | toy)", "Dataset folder", "Output folder", "LoRA rank (network_rank)",
        "Training steps (max_train_steps)", "Validation prompt(s), separated by |", "Resolution in pixels",
        "Base model precision (base_model_precision)",
        "Write a multidatabackend.json (SimpleTuner's dataloader file) instead of instance_data_dir? (y/n)",
    ]
    assert asked[3].endswith("[16]: ")  # each question shows its default
    config = load_quietly(project / "config.jsonc")
    assert (config.network_rank, config.max_train_steps, config.resolution) == (32, 250, 192)
    assert config.validation_prompts == ["a red circle", "blue stripes"]
    assert config.base_model_precision == "int8-quanto"
    assert config.output_dir == str(project / "runs" / "one")


def test_enter_takes_the_default_and_a_bad_answer_is_asked_again(project, monkeypatch, capsys):
    answers(monkeypatch, "tiny", "dataset", "", "sixteen", "", "", "", "100", "", "", "")
    assert configure.main([]) == 0
    out = capsys.readouterr().out
    assert "give a whole number of 1 or more; try again" in out
    assert "must be a multiple of 64 pixels (try 128); try again" in out
    values = json5.loads((project / "config.jsonc").read_text())
    assert values["output_dir"] == "chroma-output" and values["network_rank"] == 16
    assert values["resolution"] == 256  # the tiny flavour's default, after 100 was refused
    demo = demo_config(Path("dataset"), Path("output"))  # tiny's defaults are the demo's
    assert (values["max_train_steps"], values["validation_prompt"]) == (120, demo["validation_prompt"])


def test_a_missing_dataset_folder_is_written_only_when_confirmed(project, monkeypatch):
    rest = [""] * 7  # output, rank, steps, prompts, resolution, precision, multidatabackend: defaults
    asked = answers(monkeypatch, "tiny", "later", "n", "dataset", *rest)  # no: asked for the folder again
    assert configure.main([]) == 0
    assert "later does not exist" in asked[2]
    assert json5.loads((project / "config.jsonc").read_text())["instance_data_dir"] == "dataset"
    answers(monkeypatch, "tiny", "later", "y", *rest)
    assert configure.main(["--force"]) == 0
    assert json5.loads((project / "config.jsonc").read_text())["instance_data_dir"] == "later"


def test_input_that_ends_early_says_how_to_run_without_questions(project, monkeypatch, capsys):
    answers(monkeypatch, "tiny")
    assert configure.main([]) == 2
    assert "(input ended): give --dataset, or --yes to take the defaults" in capsys.readouterr().err
    assert not (project / "config.jsonc").exists()


# --- never overwrite ---------------------------------------------------------------------------
def test_an_existing_config_is_kept_unless_force(project, capsys):
    (project / "config.jsonc").write_text("{} // mine\n")
    assert configure.main(["--yes", "--flavour", "tiny", "--dataset", "dataset"]) == 2
    err = capsys.readouterr().err
    assert "config.jsonc already exists" in err and "--force" in err
    assert (project / "config.jsonc").read_text() == "{} // mine\n"
    assert configure.main(["--yes", "--force", "--flavour", "tiny", "--dataset", "dataset"]) == 0
    assert json5.loads((project / "config.jsonc").read_text())["model_flavour"] == "tiny"


def test_answering_n_to_replace_keeps_the_file_and_asks_nothing_else(project, monkeypatch):
    (project / "config.jsonc").write_text("{} // mine\n")
    asked = answers(monkeypatch, "n")
    assert configure.main([]) == 1
    assert asked == ["config.jsonc already exists. Replace it? [y/N]: "]
    assert (project / "config.jsonc").read_text() == "{} // mine\n"


# --- the precision proposal ----------------------------------------------------------------------
@pytest.mark.parametrize("free_gib", [24, 12])
def test_on_a_gpu_it_proposes_what_auto_would_pick_and_prints_why(project, monkeypatch, capsys, free_gib):
    device = fake_gpu(monkeypatch, free_gib)
    assert configure.main(["--yes", "--flavour", "base", "--dataset", "dataset"]) == 0
    written = load_quietly(project / "config.jsonc")

    settings = {key: getattr(written, key) for key in ("model_flavour", "network_rank", "resolution", "train_batch_size",
                                                        "tokenizer_max_length", "gradient_checkpointing")}
    estimates = configure.estimates_for(config_from_dict(settings), configure.transformer_config("base"), device)
    expected, _ = choose_precision("auto", estimates, "cuda", free_gib * GIB)
    assert written.base_model_precision == expected
    out = capsys.readouterr().out
    assert f"{free_gib:.1f} GiB of device memory free" in out
    for precision in AUTO_ORDER:  # every candidate with its estimate and verdict
        assert re.search(rf"{precision}\s+{estimates[precision].training_device / GIB:.1f} GiB  (fits|does not fit)", out)
    assert f"Proposed base_model_precision: {expected}" in out
    assert "impractical" not in out and "need CUDA/ROCm" not in out


def test_less_memory_means_a_coarser_proposal(project, monkeypatch):
    picks = []
    for free_gib in (40, 12, 9):
        fake_gpu(monkeypatch, free_gib)
        assert configure.main(["--yes", "--force", "--flavour", "base", "--dataset", "dataset"]) == 0
        picks.append(json5.loads((project / "config.jsonc").read_text())["base_model_precision"])
    assert picks[0] == "no_change"
    assert [AUTO_ORDER.index(p) for p in picks] == sorted(AUTO_ORDER.index(p) for p in picks)
    assert picks[-1] != "no_change"


def test_the_real_chroma_shape_comes_from_diffusers_defaults():
    shape = configure.transformer_config("base")
    assert (shape["num_layers"], shape["num_single_layers"], shape["num_attention_heads"]) == (19, 38, 24)
    assert configure.transformer_config("tiny")["num_layers"] == 1


def test_on_the_cpu_it_warns_about_the_real_model_and_bitsandbytes(project, monkeypatch, capsys):
    monkeypatch.setattr(configure, "detect_device", lambda: DeviceInfo("cpu", "cpu", "cpu"))
    assert configure.main(["--yes", "--flavour", "base", "--dataset", "dataset"]) == 0
    out = capsys.readouterr().out
    assert "Training the real Chroma (8.9B parameters) on a CPU is impractically slow" in out
    assert "nf4-bnb and int8-bnb (bitsandbytes) need CUDA/ROCm" in out
    assert configure.main(["--yes", "--force", "--flavour", "tiny", "--dataset", "dataset"]) == 0
    out = capsys.readouterr().out
    assert "impractically slow" not in out  # tiny is made for the CPU
    assert load_quietly(project / "config.jsonc").base_model_precision in AUTO_ORDER


def test_a_prompt_flag_is_taken_as_it_is(project):
    assert configure.main(["--yes", "--flavour", "tiny", "--dataset", "dataset", "--prompt", "cats | dogs",
                           "--prompt", "a bird"]) == 0
    assert load_quietly(project / "config.jsonc").validation_prompts == ["cats | dogs", "a bird"]


def test_precision_flag_overrides_the_proposal(project):
    assert configure.main(["--yes", "--flavour", "tiny", "--dataset", "dataset", "--precision", "int4-quanto"]) == 0
    text = (project / "config.jsonc").read_text()
    assert json5.loads(text)["base_model_precision"] == "int4-quanto"
    assert "your choice; configure proposed" in text


# --- multidatabackend.json -----------------------------------------------------------------------
def test_multidatabackend_mode_writes_simpletuners_dataloader_file(project):
    assert configure.main(["--yes", "--flavour", "tiny", "--dataset", "dataset", "--output-dir", "output",
                           "--resolution", "512", "--multidatabackend"]) == 0
    config = json5.loads((project / "config.jsonc").read_text())
    assert config["data_backend_config"] == "multidatabackend.json" and "instance_data_dir" not in config
    backends = json.loads((project / "multidatabackend.json").read_text())
    assert isinstance(backends, list) and len(backends) == 2
    images, text = backends
    assert images == {"id": "dataset", "type": "local", "instance_data_dir": "dataset", "resolution": 512,
                      "resolution_type": "pixel_area", "minimum_image_size": 0, "caption_strategy": "textfile",
                      "repeats": 0, "crop": False}
    assert text == {"id": "text-embeds", "dataset_type": "text_embeds", "default": True, "type": "local",
                    "cache_dir": "cache/text/{model_family}"}
    loaded = load_config(project / "config.jsonc")  # read as the pipeline reads it
    assert [(d.id, d.root, d.setting("resolution", loaded)) for d in loaded.image_datasets] == [
        ("dataset", project / "dataset", 512)]


def test_an_existing_multidatabackend_file_is_kept_too(project, capsys):
    (project / "multidatabackend.json").write_text("[]")
    assert configure.main(["--yes", "--flavour", "tiny", "--dataset", "dataset", "--multidatabackend"]) == 2
    assert "multidatabackend.json already exists" in capsys.readouterr().err
    assert (project / "multidatabackend.json").read_text() == "[]"
    assert not (project / "config.jsonc").exists()  # nothing half-written


# --- the command and the README ------------------------------------------------------------------
def test_chroma_pipeline_configure_is_the_console_script():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["chroma-pipeline"] == "chroma_pipeline.configure:cli"
    assert configure.cli(["train"]) == 2  # only `configure` so far


def test_python_dash_m_runs_it():
    done = subprocess.run([sys.executable, "-m", "chroma_pipeline.configure", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    for flag in ("--flavour", "--dataset", "--output-dir", "--rank", "--steps", "--prompt", "--resolution", "--precision",
                 "--multidatabackend", "--config", "--yes", "--non-interactive", "--force"):
        assert flag in done.stdout


def test_non_interactive_is_another_name_for_yes(project, monkeypatch):
    answers(monkeypatch)  # any question would fail: there are no answers
    assert configure.main(["--non-interactive", "--flavour", "tiny", "--dataset", "dataset"]) == 0


def test_the_readme_example_works_as_written(tmp_path, monkeypatch):
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Writing a config: `chroma-pipeline configure`")[1].split("\n## ")[0]
    commands = re.findall(r"```bash\n(.*?)\n```", section, re.S)
    assert commands[0] == ".venv/bin/chroma-pipeline configure"
    example = shlex.split(commands[1])
    assert example[:2] == [".venv/bin/chroma-pipeline", "configure"]
    make_demo_dataset(tmp_path / "chroma-demo" / "dataset", count=4)  # what `chroma-demo` leaves behind
    monkeypatch.chdir(tmp_path)
    assert configure.cli(example[1:]) == 0
    config = load_quietly(tmp_path / "my-config.jsonc")
    assert (config.model_flavour, config.network_rank, config.max_train_steps) == ("tiny", 8, 100)
    assert config.validation_prompts == ["a red circle", "blue stripes"]
    assert config.instance_data_dir == str(tmp_path / "chroma-demo" / "dataset")
    assert config.output_dir == str(tmp_path / "chroma-demo" / "my-output")
