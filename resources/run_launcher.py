"""Dagster's default run launcher, made able to tell run monitoring whether a run's worker is alive.

The default launcher asks the code server to start each run's worker as a local process, and
cannot say later whether that process still exists: a run whose worker died together with
`dagster dev` (kill -9, a closed terminal, a power cut) stays STARTED for ever and holds the
run queue's one slot. Run monitoring asks the launcher exactly that question; this one answers
from the worker's pid, which Dagster records on the run's RUN_START event, when the code server
is on this machine. Anywhere else it answers "unknown", and the run is left alone.

The daemon and the webserver import this module: it must stay free of torch and of the project.
"""

from __future__ import annotations

import json

import psutil
from dagster import DagsterEventType, DagsterRun, DefaultRunLauncher

# The return types of the RunLauncher interface's health check; Dagster exports the launcher, not these.
from dagster._core.launcher import CheckRunHealthResult, WorkerStatus

GRPC_INFO_TAG = ".dagster/grpc_info"  # where the default launcher notes which code server started the worker
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", None}


class LocalRunLauncher(DefaultRunLauncher):
    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        grpc_info = json.loads(run.tags.get(GRPC_INFO_TAG, "{}"))
        if grpc_info.get("host") not in LOCAL_HOSTS:
            return CheckRunHealthResult(WorkerStatus.UNKNOWN, "the worker runs on another machine's code server")
        starts = self._instance.all_logs(run.run_id, of_type=DagsterEventType.RUN_START)
        if not starts or starts[0].dagster_event is None or starts[0].dagster_event.pid is None:
            return CheckRunHealthResult(WorkerStatus.UNKNOWN, "the worker has not reported its process yet")
        pid = starts[0].dagster_event.pid
        if worker_alive(pid, run.run_id):
            return CheckRunHealthResult(WorkerStatus.RUNNING, run_worker_id=str(pid))
        return CheckRunHealthResult(
            WorkerStatus.FAILED, f"the run's worker process (pid {pid}) is gone: it was killed, or dagster dev "
            "stopped while the run was in progress", run_worker_id=str(pid))


def worker_alive(pid: int, run_id: str) -> bool:
    """Whether `pid` is still this run's worker (a pid reused by another process is not)."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return run_id in " ".join(process.cmdline())
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # someone else's process, perhaps ours under another user: do not call it dead
        return True
