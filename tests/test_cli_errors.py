"""A command that fails on a user error says why once, in a line, with no traceback; a bug keeps its traceback."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chroma_pipeline.config import ConfigError
from chroma_pipeline.errors import TRACEBACK_ENV, run_command
from tests.conftest import write_config

REPO = Path(__file__).resolve().parents[1]
TRACEBACK_MARKS = ("Traceback (most recent call last)", "Stack Trace:", 'File "')


def command(*args, cwd, traceback=False, **env):
    # PYTHONPATH: the command runs this checkout, wherever the package is installed from.
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", TRACEBACK_ENV: "1" if traceback else "", **env}
    return subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def assert_said_once_without_traceback(done, reason: str):
    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-3000:]
    assert output.count(reason) == 1, output[-3000:]
    assert not [line for line in output.splitlines() if any(mark in line for mark in TRACEBACK_MARKS)], output[-3000:]


@pytest.fixture
def bad_config(small_project, tmp_path) -> Path:
    values = {**json.loads(small_project.read_text()), "mixed_precision": "fp64"}
    return write_config(tmp_path / "bad.json", values)


def test_a_bad_setting_is_one_line_from_the_training_command(bad_config, tmp_path):
    done = command(sys.executable, "-m", "chroma_pipeline.train", "--config", str(bad_config), cwd=tmp_path)
    assert_said_once_without_traceback(done, "`mixed_precision` = 'fp64' is not allowed; allowed values: 'bf16', 'fp16' or 'no'")
    assert done.stderr.startswith(f"python -m chroma_pipeline.train: error: {bad_config}: invalid settings:")


def test_the_traceback_is_there_when_asked_for(bad_config, tmp_path):
    done = command(sys.executable, "-m", "chroma_pipeline.train", "--config", str(bad_config), cwd=tmp_path,
                   traceback=True)
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr
    assert "ConfigError" in done.stderr


def test_a_step_that_fails_on_a_user_error_is_one_line_from_chroma_demo(tmp_path):
    """The demo's run goes through Dagster: the step failure is logged as such, its reason said once."""
    demo = Path(sys.executable).with_name("chroma-demo")  # the console script pip installed
    done = command(str(demo), "--root", str(tmp_path / "demo"), "--images", "4", cwd=tmp_path,
                   CHROMA_DEVICE="tpu", DAGSTER_HOME=str(tmp_path / "home"))
    assert_said_once_without_traceback(done, "unknown device 'tpu'; use auto, cuda, cuda:N, mps or cpu")
    assert "chroma-demo: error: quantized_base_model: unknown device 'tpu'" in done.stderr
    assert 'STEP_FAILURE - Execution of step "quantized_base_model" failed.' in done.stderr  # Dagster's log stays


def test_a_missing_config_file_is_one_line(tmp_path):
    done = command(sys.executable, "-m", "chroma_pipeline.launch", "--config", "nowhere.jsonc", "--machine-rank", "1",
                   cwd=tmp_path)
    assert_said_once_without_traceback(done, "config file not found: nowhere.jsonc")


def test_an_unexpected_error_keeps_its_traceback(monkeypatch, capsys):
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)

    def buggy(argv):
        return {}["missing"]

    with pytest.raises(KeyError):
        run_command(buggy, "prog")

    def refused(argv):
        raise ConfigError("`network_rank` = 0: must be 1 or more")

    assert run_command(refused, "prog") == 1
    assert capsys.readouterr().err.splitlines()[0] == "prog: error: `network_rank` = 0: must be 1 or more"
