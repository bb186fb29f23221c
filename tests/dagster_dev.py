"""A real `dagster dev` for the tests: on 127.0.0.1, with its own DAGSTER_HOME, stopped with all it started."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class DevServer:
    url: str
    port: int
    process: subprocess.Popen  # the leader of the process group: dagster dev, its daemon, code server and runs

    def crash(self) -> None:
        """What a closed terminal or a power cut does: every process of it dies at once, nothing cleans up."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)


def dagster_env(home: Path, config: Path) -> dict[str, str]:
    # PYTHONPATH: the processes dagster dev starts import this checkout, wherever the package is installed from.
    return {**os.environ, "DAGSTER_HOME": str(home), "CHROMA_CONFIG": str(config), "CHROMA_DEVICE": "cpu",
            "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


@contextlib.contextmanager
def serve(home: Path, config: Path, log_path: Path, command: list[str] | None = None, cwd: Path = REPO,
          keep_log_in: Path | None = None, startup_s: int = 180):
    """`dagster dev` on 127.0.0.1 with its own DAGSTER_HOME; yields a DevServer once the UI answers.

    `command` replaces `dagster dev -w <this repo's workspace.yaml>` (the port is added to it).
    """
    port = free_port()
    command = command or [sys.executable, "-m", "dagster", "dev", "-w", str(REPO / "workspace.yaml")]
    log = open(log_path, "w")
    server = subprocess.Popen([*command, "-h", "127.0.0.1", "-p", str(port)], cwd=cwd, env=dagster_env(home, config),
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            try:
                urllib.request.urlopen(f"{url}/server_info", timeout=2)
                break
            except OSError:
                assert server.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, f"dagster dev did not answer in {startup_s}s: {log_path}"
                time.sleep(0.5)
        yield DevServer(url, port, server)
    finally:
        with contextlib.suppress(ProcessLookupError):  # a test may have crashed it already
            os.killpg(server.pid, signal.SIGTERM)  # dagster dev, its daemon, code server and runs
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
        if keep_log_in is not None:
            keep_log_in.mkdir(parents=True, exist_ok=True)
            shutil.copy(log_path, keep_log_in / log_path.name)
