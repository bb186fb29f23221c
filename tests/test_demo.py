"""What `chroma-demo` leaves for `dagster dev`: an instance with run monitoring, and a command that works anywhere."""

import json
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from dagster import DagsterInstance

from assets import demo
from assets.demo import INSTANCE_SETTINGS, OLDER_DEMO_INSTANCE, RUN_MONITORING, prepare_instance
from tests.dagster_dev import serve

PREFIX = "Browse the runs (from any folder): "
LOCATION_QUERY = (
    "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus locationOrLoadError { __typename "
    "... on PythonError { message } ... on RepositoryLocation { repositories { assetNodes { id } } } } } } } }"
)


def loaded_location(url: str, seconds: float = 120) -> dict:
    """The one code location of the server, once it has loaded (or failed to)."""
    deadline = time.monotonic() + seconds
    while True:
        request = urllib.request.Request(f"{url}/graphql", json.dumps({"query": LOCATION_QUERY}).encode(),
                                         {"Content-Type": "application/json"})
        (entry,) = json.load(urllib.request.urlopen(request, timeout=60))["data"]["workspaceOrError"]["locationEntries"]
        if entry["loadStatus"] == "LOADED" or time.monotonic() > deadline:
            return entry["locationOrLoadError"]
        time.sleep(0.5)


def test_a_new_demo_instance_monitors_runs_and_queues_them_one_at_a_time(tmp_path):
    home = tmp_path / "home"
    assert prepare_instance(home) is None
    with DagsterInstance.from_config(str(home)) as instance:  # Dagster reads and validates the file
        assert instance.run_monitoring_enabled
        assert instance.run_monitoring_settings == RUN_MONITORING
        assert instance.run_monitoring_max_resume_run_attempts == 0
        assert instance.get_concurrency_config().run_queue_config.max_concurrent_runs == 1


def test_an_older_demo_instance_gets_run_monitoring_and_an_edited_one_is_left_alone(tmp_path):
    older = tmp_path / "older"
    older.mkdir()
    (older / "dagster.yaml").write_text(OLDER_DEMO_INSTANCE)
    assert "added run monitoring" in prepare_instance(older)
    with DagsterInstance.from_config(str(older)) as instance:
        assert instance.run_monitoring_enabled

    edited = tmp_path / "edited"
    edited.mkdir()
    mine = "# my instance\nrun_queue:\n  max_concurrent_runs: 2\ntelemetry:\n  enabled: false\n"
    (edited / "dagster.yaml").write_text(mine)
    note = prepare_instance(edited)
    assert (edited / "dagster.yaml").read_text() == mine  # not a byte changed
    assert "has no run_monitoring or run_launcher setting; left as it is" in note and "README 'The Dagster UI'" in note

    complete = tmp_path / "complete"
    complete.mkdir()
    (complete / "dagster.yaml").write_text(json.dumps({**INSTANCE_SETTINGS, "telemetry": {"enabled": False}}))
    assert prepare_instance(complete) is None


@pytest.mark.slow
def test_the_browse_command_chroma_demo_prints_works_from_another_folder(small_project, tmp_path, monkeypatch, capsys):
    # The run itself is not what this test is about: the demo's chain is stood in for.
    finished = SimpleNamespace(success=True, asset_materializations_for_node=lambda node: [
        SimpleNamespace(metadata={"grid path": SimpleNamespace(value="grid.png")})])
    monkeypatch.setattr("assets.definitions.materialize_chain", lambda *args, **kwargs: finished)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "demo" / ".dagster"))
    assert demo.main(["--root", str(tmp_path / "demo"), "--images", "4"]) == 0
    printed = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(PREFIX))[len(PREFIX):]

    # Anywhere: here a folder with no workspace.yaml, and an `assets` package of its own.
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "assets").mkdir(parents=True)
    (elsewhere / "assets" / "__init__.py").write_text("")
    (elsewhere / "assets" / "definitions.py").write_text("raise SystemExit('the wrong assets package was loaded')\n")
    shell = ["bash", "-c", printed + ' "$@"', "bash"]  # the test's -h and -p follow the printed command
    # (serve's own DAGSTER_HOME and CHROMA_CONFIG are overridden by the ones the command sets)
    with serve(tmp_path / "unused", small_project, tmp_path / "browse.log", command=shell, cwd=elsewhere) as server:
        location = loaded_location(server.url)
    assert location["__typename"] == "RepositoryLocation", location
    assets = {node["id"].rsplit(".", 1)[-1] for node in location["repositories"][0]["assetNodes"]}
    assert {"raw_dataset/images", "lora_adapter", "validation_grid"} <= assets


def test_the_readme_shows_the_settings_the_demo_writes():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("The demo's `DAGSTER_HOME` holds this `dagster.yaml`", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(block) == INSTANCE_SETTINGS
    assert yaml.safe_load(demo.instance_yaml()) == INSTANCE_SETTINGS
