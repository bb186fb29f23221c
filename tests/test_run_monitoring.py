"""Dead runs are marked failed: a real `dagster dev`, runs launched over its GraphQL API, processes killed.

The instance is the demo's (assets/demo.py writes these settings into its dagster.yaml), with
the monitoring daemon polling every second so the test need not wait a minute.
"""

import os
import signal
import time

import pytest
import yaml
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus
from dagster_graphql import DagsterGraphQLClient

from assets.demo import INSTANCE_SETTINGS, RUN_MONITORING
from resources.run_launcher import worker_alive
from tests.dagster_dev import serve

pytestmark = pytest.mark.slow


def write_instance(home, **monitoring):
    """The demo's dagster.yaml, with `monitoring` replacing some of its run_monitoring values."""
    home.mkdir(exist_ok=True)
    settings = {**INSTANCE_SETTINGS, "run_monitoring": {**RUN_MONITORING, **monitoring}, "telemetry": {"enabled": False}}
    (home / "dagster.yaml").write_text(yaml.safe_dump(settings))


def wait_for(instance, run_id, statuses, seconds, every=0.1):
    """The run's status once it is one of `statuses` (a bounded wait: fails after `seconds`)."""
    deadline = time.monotonic() + seconds
    while True:
        status = instance.get_run_by_id(run_id).status
        if status in statuses or time.monotonic() > deadline:
            assert status in statuses, f"run {run_id} still {status} after {seconds}s"
            return status
        time.sleep(every)


def worker_pid(instance, run_id) -> int:
    """The process executing the run: the one that reported RUN_START (all steps run in it)."""
    (start,) = instance.all_logs(run_id, of_type=DagsterEventType.RUN_START)
    return start.dagster_event.pid


def test_a_run_whose_process_was_killed_is_marked_failed(small_project, tmp_path):
    home = tmp_path / "dagster_home"
    write_instance(home, poll_interval_seconds=1)
    instance = DagsterInstance.from_config(str(home))
    assert instance.run_monitoring_enabled

    with serve(home, small_project, tmp_path / "dagster-dev.log") as server:
        client = DagsterGraphQLClient("127.0.0.1", port_number=server.port)

        # 1. The worker is SIGKILLed (out of memory, kill -9) while dagster dev runs.
        killed = client.submit_job_execution("full_chain")  # minutes of work: it is still running when killed
        wait_for(instance, killed, {DagsterRunStatus.STARTED}, 120)
        os.kill(worker_pid(instance, killed), signal.SIGKILL)
        assert wait_for(instance, killed, {DagsterRunStatus.FAILURE}, 30) == DagsterRunStatus.FAILURE
        said = " ".join(entry.message for entry in instance.all_logs(killed))
        # Whichever notices first says so: the code server that started the worker, or run monitoring.
        assert "was terminated by signal 9 (SIGKILL)" in said or "worker process" in said and "is gone" in said

        # 2. dagster dev dies while a run is in progress: its worker dies with it (one process group).
        left_started = client.submit_job_execution("full_chain")
        wait_for(instance, left_started, {DagsterRunStatus.STARTED}, 120)
        worker = worker_pid(instance, left_started)
        server.crash()
    assert instance.get_run_by_id(left_started).status == DagsterRunStatus.STARTED
    assert not worker_alive(worker, left_started)

    with serve(home, small_project, tmp_path / "dagster-dev-again.log") as server:  # the launcher sees it is gone
        assert wait_for(instance, left_started, {DagsterRunStatus.FAILURE}, 60) == DagsterRunStatus.FAILURE
        said = " ".join(entry.message for entry in instance.all_logs(left_started))
        assert f"the run's worker process (pid {worker}) is gone" in said

        # 3. dagster dev dies while a run is starting, before its worker reported in.
        client = DagsterGraphQLClient("127.0.0.1", port_number=server.port)
        orphan = client.submit_job_execution("full_chain")
        wait_for(instance, orphan, {DagsterRunStatus.STARTING}, 60, every=0.02)  # its worker takes seconds to boot
        server.crash()
    assert instance.get_run_by_id(orphan).status == DagsterRunStatus.STARTING  # nobody is left to say otherwise

    # dagster dev is back. The start timeout is shortened only now, for the one run that has no
    # worker: a run that does have one needs the demo's 180 s to boot it on a busy 2-core machine.
    write_instance(home, poll_interval_seconds=1, start_timeout_seconds=3)
    with serve(home, small_project, tmp_path / "dagster-dev-third.log"):
        assert wait_for(instance, orphan, {DagsterRunStatus.FAILURE}, 60) == DagsterRunStatus.FAILURE
    said = " ".join(entry.message for entry in instance.all_logs(orphan))
    assert "taking longer than 3 seconds to start" in said
