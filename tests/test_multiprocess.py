"""Training on several processes and machines (`accelerate launch`, DDP over gloo on CPUs) from the
lora_adapter asset, the materialization rank 0 reports through Dagster Pipes, and stopping."""

import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from dagster import DagsterInstance
from safetensors.torch import load_file

from assets.definitions import materialize_chain
from tests.conftest import CACHE_STEPS, write_config

REPO = Path(__file__).resolve().parents[1]
adapter_asset = importlib.import_module("assets.lora_adapter")  # the module; `assets.lora_adapter` is the asset
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _train(config_path: Path, instance, **settings) -> dict:
    """Materialize lora_adapter with these settings on top of the caches; returns its metadata."""
    write_config(config_path, {**json.loads(config_path.read_text()), **settings})
    result = materialize_chain(str(config_path), instance, selection=["lora_adapter"], device="cpu")
    assert result.success
    return result.asset_materializations_for_node("lora_adapter")[0].metadata


def test_two_processes_both_train_and_rank_zero_reports_the_materialization_through_pipes(small_project, monkeypatch):
    values = json.loads(small_project.read_text())
    write_config(small_project, {**values, "num_processes": 2, "max_train_steps": 6, "validation_steps": 0})
    # The asset returns what rank 0 reported; it never trains or reads the adapter back itself.
    monkeypatch.setattr(adapter_asset, "build_adapter", lambda *a, **k: pytest.fail("the asset re-entered training"))
    monkeypatch.setattr(adapter_asset, "adapter_report", lambda *a, **k: pytest.fail("the asset re-read the adapter"))
    instance = DagsterInstance.ephemeral()
    result = materialize_chain(str(small_project), instance, device="cpu")
    assert result.success
    materialization = result.asset_materializations_for_node("lora_adapter")[0]
    metadata = materialization.metadata
    assert metadata["training processes"].value == 2
    assert metadata["loss curve"].value.startswith("![loss curve](data:image/png;base64,")  # markdown, rendered by the UI
    assert metadata["steps"].value == 6 and len(json.loads(Path(metadata["adapter"].value).with_name(
        "loss_history.json").read_text())) == 6
    assert Path(metadata["adapter"].value).is_file()
    assert "gpu: device" in metadata  # the asset's own figures join rank 0's
    # The data version is rank 0's: the adapter's key, which names its folder.
    assert materialization.tags["dagster/data_version"] == Path(metadata["adapter"].value).parent.name
    per_rank = metadata["samples per rank"].value
    assert len(per_rank) == 2 and all(n >= 6 for n in per_rank)  # both ranks trained on every step (batches of 1-2)
    assert metadata["retrained"].value is True
    adapters = list((small_project.parent / "output").glob("lora/*/pytorch_lora_weights.safetensors"))
    assert len(adapters) == 1
    # Rank 0's log came through Dagster Pipes into the run.
    log = [entry.user_message for entry in instance.all_logs(result.run_id)]
    assert any("rank 0/2" in line for line in log) and not any("rank 1/2" in line for line in log)
    assert any("step 6/6" in line for line in log)


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])  # SIGINT: what Pipes sends on cancel
def test_a_stop_signal_ends_training_after_a_checkpoint_and_leaves_no_worker_behind(small_project, stop_signal):
    values = json.loads(small_project.read_text())
    write_config(small_project, {**values, "num_processes": 2, "max_train_steps": 2000, "validation_steps": 0,
                                 "checkpointing_steps": 1000})
    assert materialize_chain(str(small_project), DagsterInstance.ephemeral(), selection=CACHE_STEPS, device="cpu").success
    from chroma_pipeline.config import load_config
    from chroma_pipeline.launch import launch_command

    command = launch_command(str(small_project), load_config(small_project), "cpu")
    launcher = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 180
    for line in launcher.stdout:  # wait until training is under way
        if "step 10/2000" in line:
            break
        assert time.monotonic() < deadline and launcher.poll() is None, "training did not start"
    workers = psutil.Process(launcher.pid).children(recursive=True)
    assert len([w for w in workers if "chroma_pipeline.train" in " ".join(w.cmdline())]) == 2
    launcher.send_signal(stop_signal)
    output = launcher.communicate(timeout=120)[0]
    assert launcher.returncode != 0
    assert "stopped on request after step" in output
    checkpoints = list((small_project.parent / "output").glob("checkpoints/*/step_*/manifest.json"))
    assert len(checkpoints) == 1, output[-2000:]
    time.sleep(1)
    assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE], "orphaned workers"


def test_one_process_two_processes_and_two_machines_train_the_same_adapter(small_project):
    """Two batches per step, three ways: accumulated in one process, one per process, one per machine.

    Each batch's noise follows its place in the shared batch order, so the three runs see the
    same data and noise, and DDP's average equals accumulation's: the adapters agree to float
    rounding.
    """
    values = json.loads(small_project.read_text())
    write_config(small_project, {**values, "max_train_steps": 6, "validation_steps": 0, "caption_dropout_probability": 0.3})
    instance = DagsterInstance.ephemeral()
    assert materialize_chain(str(small_project), instance, selection=CACHE_STEPS, device="cpu").success

    accumulated = _train(small_project, instance, gradient_accumulation_steps=2)
    two_processes = _train(small_project, instance, gradient_accumulation_steps=1, num_processes=2)
    port = _free_port()
    machine_one = subprocess.Popen(  # the other "machine": same config, same shared output_dir
        [sys.executable, "-m", "chroma_pipeline.launch", "--config", str(small_project), "--machine-rank", "1",
         "--device", "cpu"],
        cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        write_config(small_project, {**json.loads(small_project.read_text()), "num_processes": 1, "num_machines": 2,
                                     "main_process_port": port})
        two_machines = _train(small_project, instance)
        output = machine_one.communicate(timeout=120)[0]
    finally:
        machine_one.kill()
    assert machine_one.returncode == 0, output[-3000:]
    assert two_machines["training processes"].value == 2 and two_processes["training processes"].value == 2

    adapters = [load_file(m["adapter"].value) for m in (accumulated, two_processes, two_machines)]
    assert len({m["adapter"].value for m in (accumulated, two_processes, two_machines)}) == 3  # three trainings
    reference = adapters[0]
    assert any(tensor.abs().max() > 0 for name, tensor in reference.items() if "lora_B" in name)  # it trained
    for layout, other in zip(("1 machine x 2 processes", "2 machines x 1 process"), adapters[1:], strict=True):
        assert other.keys() == reference.keys()
        worst = max(float((other[name] - reference[name]).abs().max()) for name in reference)
        print(f"{layout} vs 1 process accumulating 2 batches: max |difference| {worst:.3g}")
        for name in reference:
            torch.testing.assert_close(other[name], reference[name], rtol=1e-4, atol=1e-6)
    losses = [json.loads(Path(m["adapter"].value).with_name("loss_history.json").read_text())
              for m in (accumulated, two_processes, two_machines)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5) and losses[2] == pytest.approx(losses[0], rel=1e-5)
