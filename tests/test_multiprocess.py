"""Training on several processes (`accelerate launch`, DDP over gloo on CPUs) from the lora_adapter asset, and stopping."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from dagster import DagsterInstance

from assets.definitions import materialize_chain
from tests.conftest import CACHE_STEPS, write_config

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_two_processes_both_train_and_rank_zero_writes_one_adapter(small_project):
    values = json.loads(small_project.read_text())
    write_config(small_project, {**values, "num_processes": 2, "max_train_steps": 6, "validation_steps": 0})
    instance = DagsterInstance.ephemeral()
    result = materialize_chain(str(small_project), instance, device="cpu")
    assert result.success
    metadata = result.asset_materializations_for_node("lora_adapter")[0].metadata
    assert metadata["training processes"].value == 2
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

    launcher = subprocess.Popen(launch_command(str(small_project), load_config(small_project), "cpu"), cwd=REPO, stdout=subprocess.PIPE,
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
