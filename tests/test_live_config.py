"""Editing the config while the UI runs: runs are refused until a reload, and automation never loops.

`dagster dev` loads the code location once, in a code server process, and keeps it until
you reload it; every run is executed by a worker process that imports the code afresh.
These tests hold a code location the same way (dagster-graphql's out-of-process
workspace: a real code server over this project's instance), launch runs through the
GraphQL mutation the UI's "Materialize" button sends, and tick the automation sensor
and the folder watcher with the definitions that code location loaded.
"""

import contextlib
import json
import time
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterRunStatus, build_sensor_context, evaluate_automation_conditions
from dagster_graphql.test.utils import define_out_of_process_workspace, execute_dagster_graphql

from assets.definitions import build_definitions
from tests.test_staleness import STALENESS_QUERY, Project

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TICKS = 10

LAUNCH = """
mutation Launch($executionParams: ExecutionParams!) {
  launchPipelineExecution(executionParams: $executionParams) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
  }
}
"""


class LiveCodeLocation:
    """The code location as a running `dagster dev` holds it: loaded once, until `reload()`."""

    def __init__(self, project: Project, stack: contextlib.ExitStack):
        self.project, self.stack = project, stack
        self.cursor, self.watch_cursor, self.launched = None, None, []
        self.reload()

    def reload(self):
        """Deployment > Reload: a new code server reads the config file as it is now."""
        self.workspace = self.stack.enter_context(
            define_out_of_process_workspace(str(REPO / "workspace.yaml"), None, self.project.instance))
        self.definitions = build_definitions(str(self.project.config_path), device="cpu")
        # The sensors' cursors live in the instance: a reload keeps them.

    def materialize(self, assets: set[str]) -> DagsterRunStatus:
        """What the UI's Materialize button does: launch a run, executed by a fresh worker process."""
        selector = {"repositoryLocationName": self.workspace.code_location_names[0],
                    "repositoryName": "__repository__", "pipelineName": "__ASSET_JOB",
                    "assetSelection": [{"path": name.split("/")} for name in sorted(assets)]}
        result = execute_dagster_graphql(self.workspace.create_request_context(), LAUNCH,
                                         {"executionParams": {"selector": selector, "runConfigData": {}}})
        launched = result.data["launchPipelineExecution"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        run_id = launched["run"]["runId"]
        self.launched.append(run_id)
        instance = self.project.instance
        if instance.get_run_by_id(run_id).status == DagsterRunStatus.QUEUED:
            instance.launch_run(run_id, self.workspace.create_request_context())  # the daemon's dequeue
        for _ in range(360):
            run = instance.get_run_by_id(run_id)
            if run.is_finished:
                return run.status
            time.sleep(0.5)
        raise AssertionError(f"run {run_id} did not finish in 3 minutes: {run.status}")

    def tick(self) -> set[str]:
        """One tick of `chroma_automation` with this code location's definitions; launches what it requests."""
        result = evaluate_automation_conditions(defs=self.definitions, instance=self.project.instance, cursor=self.cursor)
        self.cursor = result.cursor
        graph = self.definitions.resolve_asset_graph()
        requested = {key.to_user_string() for key in graph.materializable_asset_keys if result.get_num_requested(key)}
        if requested:
            self.materialize(requested)
        return requested

    def watch(self):
        """One tick of `dataset_watch`; stores its events, as the daemon does."""
        sensor = self.definitions.get_sensor_def("dataset_watch")
        with build_sensor_context(instance=self.project.instance, resources=self.definitions.resources,
                                  cursor=self.watch_cursor) as context:
            data = sensor.evaluate_tick(context)
        self.watch_cursor = data.cursor
        for event in data.asset_events:
            self.project.instance.report_runless_asset_event(event)
        return data.skip_message, data.asset_events

    def unsynced(self) -> set[str]:
        """What this code location's UI shows as unsynced or missing."""
        nodes = execute_dagster_graphql(self.workspace.create_request_context(), STALENESS_QUERY).data["assetNodes"]
        return {"/".join(n["assetKey"]["path"]) for n in nodes if n["isMaterializable"] and n["staleStatus"] != "FRESH"}

    def failure_message(self, run_id: str) -> str:
        records = self.project.instance.all_logs(run_id)
        return "\n".join(str(r.dagster_event.event_specific_data) for r in records
                         if r.dagster_event and r.dagster_event.is_failure)


def _materializations(project: Project, name: str) -> int:
    return len(project.instance.fetch_materializations(AssetKey(name.split("/")), limit=100).records)


@pytest.fixture
def live(small_project, monkeypatch):
    monkeypatch.setenv("CHROMA_CONFIG", str(small_project))  # what the code server and its run workers read
    monkeypatch.setenv("CHROMA_DEVICE", "cpu")
    project = Project(small_project, monkeypatch)
    project.materialize()
    with contextlib.ExitStack() as stack:
        yield LiveCodeLocation(project, stack)


def test_a_config_edited_without_reload_refuses_runs_and_automation_starts_none(live):
    project = live.project
    assert live.tick() == set() and live.launched == []  # everything is synced to start with
    trained = _materializations(project, "lora_adapter")
    old_rate = json.loads(project.config_path.read_text())["learning_rate"]
    project.set(learning_rate=old_rate * 2)  # saved in the editor; the code location is not reloaded

    # The user presses Materialize on lora_adapter: refused before any work, with the advice.
    assert live.materialize({"lora_adapter"}) == DagsterRunStatus.FAILURE
    reason = live.failure_message(live.launched[-1])
    assert "changed since the code location loaded it (learning_rate:" in reason
    assert "Reload the code location" in reason
    assert _materializations(project, "lora_adapter") == trained

    # The folder watcher says so on the sensor's tick and, once, on the asset that reads the setting.
    message, events = live.watch()
    assert "config changed since the code location loaded (learning_rate)" in message
    assert {event.asset_key.to_user_string() for event in events} == {"lora_adapter"}
    assert "config changed: reload the code location" in events[0].metadata
    assert live.watch()[1] == [], "one change is noted once"
    assert live.unsynced() == set()  # the notes change nothing Dagster calls unsynced

    runs_before = len(live.launched)
    requested = [live.tick() for _ in range(TICKS)]
    assert requested == [set()] * TICKS and len(live.launched) == runs_before  # no run at all, let alone a loop

    live.reload()
    assert live.tick() == {"lora_adapter", "validation_grid"}  # the setting's asset and what reads it, once
    assert project.instance.get_run_by_id(live.launched[-1]).status == DagsterRunStatus.SUCCESS
    assert [live.tick() for _ in range(TICKS)] == [set()] * TICKS
    assert _materializations(project, "lora_adapter") == trained + 1
    assert live.watch()[0].endswith("dataset folder unchanged")  # and no more config note
