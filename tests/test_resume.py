"""A training run killed mid-way resumes from its newest good checkpoint and ends where an unbroken run ends."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from dagster import DagsterInstance
from safetensors.torch import load_file

from assets.definitions import materialize_chain
from tests.conftest import CACHE_STEPS, write_config

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _messages(instance, result) -> list[str]:
    return [entry.user_message for entry in instance.all_logs(result.run_id)]


def test_killed_training_resumes_on_the_quantized_base_and_matches_an_unbroken_run(small_project):
    values = json.loads(small_project.read_text())
    assert values["base_model_precision"] == "int8-quanto"  # resuming on a quanto model is what users see fail
    write_config(small_project, {**values, "max_train_steps": 80, "checkpointing_steps": 5, "validation_steps": 20})
    output = small_project.parent / "output"
    instance = DagsterInstance.ephemeral()
    assert materialize_chain(str(small_project), instance, selection=CACHE_STEPS, device="cpu").success

    # Train in another process and kill it (no chance to clean up) once two checkpoints exist.
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    trainer = subprocess.Popen([sys.executable, "-m", "chroma_pipeline.train", "--config", str(small_project),
                                "--device", "cpu"], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not list(output.glob("checkpoints/*/step_000010/manifest.json")):
        assert trainer.poll() is None, trainer.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no second checkpoint within 5 minutes"
        time.sleep(0.02)
    trainer.send_signal(signal.SIGKILL)
    trainer.wait()
    assert trainer.returncode == -signal.SIGKILL
    assert not list(output.glob("lora/*/pytorch_lora_weights.safetensors")), "the killed run must not have finished"

    # Re-materializing resumes from the newest checkpoint, and says so.
    newest = sorted(output.glob("checkpoints/*/step_*"))[-1]
    resumed = materialize_chain(str(small_project), instance, selection=["lora_adapter"], device="cpu")
    assert resumed.success
    assert any(f"resuming from checkpoint {newest.name}" in m for m in _messages(instance, resumed))
    metadata = resumed.asset_materializations_for_node("lora_adapter")[0].metadata
    assert metadata["resumed from step"].value == int(newest.name.split("_")[1]) >= 10
    assert metadata["steps"].value == 80
    adapter = Path(metadata["adapter"].value)
    after_resume = load_file(adapter)
    losses_after_resume = json.loads((adapter.parent / "loss_history.json").read_text())

    # The same training, never interrupted.
    for folder in (adapter.parent, *output.glob("checkpoints/*")):
        subprocess.run(["rm", "-rf", str(folder)], check=True)
    unbroken = materialize_chain(str(small_project), instance, selection=["lora_adapter"], device="cpu")
    assert unbroken.asset_materializations_for_node("lora_adapter")[0].metadata["resumed from step"].value == 0
    reference = load_file(adapter)
    assert after_resume.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(after_resume[name], reference[name], rtol=1e-5, atol=1e-6)
    assert json.loads((adapter.parent / "loss_history.json").read_text()) == pytest.approx(losses_after_resume, rel=1e-5)
    assert sorted(p.name for p in adapter.parent.glob("progress/*.png")) == [
        "step_000020.png", "step_000040.png", "step_000060.png", "step_000080.png"]


def test_a_damaged_or_half_written_newest_checkpoint_is_reported_and_never_loaded(tmp_path):
    from chroma_pipeline.checkpoints import newest_usable
    from chroma_pipeline.storage import sha256_file

    folder = tmp_path / "checkpoints"
    for step in (5, 10, 15):
        checkpoint = folder / f"step_{step:06d}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "adapter.safetensors").write_bytes(b"weights %d" % step)
        (checkpoint / "manifest.json").write_text(json.dumps(
            {"step": step, "files": {"adapter.safetensors": sha256_file(checkpoint / "adapter.safetensors")}}))
    (folder / "step_000015" / "adapter.safetensors").write_bytes(b"\0" * 10)  # a disk error after it was written
    (folder / "step_000020").mkdir()  # killed before its manifest
    (folder / ".step_000025-k3j9x1").mkdir()  # killed while writing (atomic_dir staging)
    warnings = []
    assert newest_usable(folder, warn=warnings.append) == folder / "step_000010"
    assert warnings == [
        "ignoring .step_000025-k3j9x1: a checkpoint that was being written when the process stopped",
        "skipping checkpoint step_000020: no manifest (the process died while writing it)",
        "skipping checkpoint step_000015: adapter.safetensors does not match its hash",
    ]


def test_checkpoints_total_limit_keeps_the_newest(small_project):
    values = json.loads(small_project.read_text())
    write_config(small_project, {**values, "max_train_steps": 20, "checkpointing_steps": 3, "checkpoints_total_limit": 2,
                                 "validation_steps": 0})
    assert materialize_chain(str(small_project), DagsterInstance.ephemeral(), device="cpu").success
    kept = sorted(p.name for p in (small_project.parent / "output").glob("checkpoints/*/step_*"))
    assert kept == ["step_000015", "step_000018"]
