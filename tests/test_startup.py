"""A run with nothing to do starts fast: it never imports the model libraries.

The figures are `benchmarks/startup.py`'s; here is the behaviour that decides them: which packages a
re-run with every cache valid, and the Dagster code location load, import.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from chroma_pipeline import memory, train
from chroma_pipeline.lora import target_modules
from chroma_pipeline.tiny import TRANSFORMER_CONFIG

REPO = Path(__file__).resolve().parents[1]
MODEL_LIBRARIES = ("diffusers", "transformers", "peft", "optimum")


def run_and_list_imports(code: str, cwd: Path) -> tuple[str, set[str]]:
    """Run `code` in a fresh interpreter on this checkout; its output and the top-level packages it imported."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted({{name.split('.')[0] for name in sys.modules}})))"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", probe], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    *output, modules = done.stdout.splitlines()
    return "\n".join(output), set(json.loads(modules))


def test_a_re_run_with_every_cache_valid_imports_no_model_library(small_project, tmp_path, monkeypatch):
    # The user cache (weight digests, the transformer shapes the memory estimate remembers) is this test's own.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    memory.module_shapes.cache_clear()  # an earlier test's shapes, remembered in this process, would not reach the file
    memory._estimate.cache_clear()
    values = json.loads(small_project.read_text())
    small_project.write_text(json.dumps({**values, "max_train_steps": 2}))
    arguments = ["--config", str(small_project), "--device", "cpu"]
    assert train.main(arguments) == 0  # builds the tiny model, every cache and the adapter

    output, modules = run_and_list_imports(f"from chroma_pipeline.train import main; main({arguments!r})", tmp_path)
    assert "reusing trained adapter" in output
    assert sorted(modules.intersection(MODEL_LIBRARIES)) == []


def test_loading_the_code_location_imports_neither_model_libraries_nor_accelerate(small_project, tmp_path):
    _output, modules = run_and_list_imports(
        f"from assets.definitions import build_definitions; build_definitions({str(small_project)!r}, 'cpu')", tmp_path)
    assert sorted(modules.intersection({*MODEL_LIBRARIES, "accelerate"})) == []


def test_the_memory_estimate_from_remembered_shapes_is_the_one_from_the_model(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))

    def estimate():
        memory._estimate.cache_clear()
        memory.module_shapes.cache_clear()
        return memory.estimate(TRANSFORMER_CONFIG, "int4-quanto", keep=("proj_out",), rank=4,
                               lora_pattern=target_modules("all", TRANSFORMER_CONFIG["num_single_layers"]))

    built = estimate()  # builds the skeleton with diffusers, and remembers its shapes
    assert (tmp_path / "user-cache" / "chroma-pipeline" / "transformer-shapes.json").is_file()

    def no_model(_config):
        raise AssertionError("the shapes were remembered: no model needed")

    monkeypatch.setattr(memory, "_measure_shapes", no_model)
    assert estimate() == built
