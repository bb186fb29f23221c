"""`chroma-demo`: generate the demo dataset and materialize the whole chain through Dagster.

Runs are recorded in $DAGSTER_HOME (default: <root>/.dagster), so `dagster dev` with the
same DAGSTER_HOME shows the demo's materializations afterwards.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import yaml
from dagster import logger

from chroma_pipeline.commands import dagster_dev_command
from chroma_pipeline.demo_data import DEMO_IMAGES, write_demo
from chroma_pipeline.errors import run_command, traceback_wanted

# One run at a time: a run you launch and one the automation sensor launches must not share
# one accelerator (or the CPU) side by side.
RUN_QUEUE = {"max_concurrent_runs": 1}
# Dagster's run monitoring (its daemon, which `dagster dev` runs). A run whose worker dies while
# `dagster dev` is up is marked failed by the code server at once, with or without this; these
# cover what it cannot see: a run left behind by a crash of dagster dev itself. Values, and why:
RUN_MONITORING = {
    "enabled": True,
    # A run still STARTING after this long has no worker (it died before it started, or `dagster
    # dev` stopped first): marked failed. Dagster's default; a worker imports torch and loads the
    # code location before it starts (15-20 s measured on 2 CPU cores, more from a cold disk).
    "start_timeout_seconds": 180,
    # A termination that hangs this long is marked canceled, which frees the one run slot above.
    # Dagster's default; a cancelled training finishes its step and writes a checkpoint first.
    "cancel_timeout_seconds": 180,
    # The local run launcher cannot resume a run in a new worker; Dagster refuses a value above 0.
    "max_resume_run_attempts": 0,
    # How often the daemon looks (each look logs a line per unfinished run in dagster dev's
    # terminal): once a minute, not Dagster's two, so a run left behind by a crash stops holding
    # the one run slot at most a minute after dagster dev is back (after its start timeout, if it
    # was still starting).
    "poll_interval_seconds": 60,
}
# Dagster's default launcher, able to answer run monitoring's "is the worker alive?" (see
# resources/run_launcher.py): a run left STARTED by a crash of dagster dev is marked failed.
RUN_LAUNCHER = {"module": "resources.run_launcher", "class": "LocalRunLauncher"}
INSTANCE_SETTINGS = {"run_queue": RUN_QUEUE, "run_monitoring": RUN_MONITORING, "run_launcher": RUN_LAUNCHER}
# What chroma-demo wrote before run monitoring: a file exactly like this holds no edit of yours.
OLDER_DEMO_INSTANCE = "run_queue:\n  max_concurrent_runs: 1\n"


def instance_yaml(settings: dict | None = None) -> str:
    """The dagster.yaml the demo writes (`settings` replaces INSTANCE_SETTINGS, e.g. in a test)."""
    header = "# Written by chroma-demo; see README 'The Dagster UI' for what each setting does.\n"
    return header + yaml.safe_dump(INSTANCE_SETTINGS if settings is None else settings, sort_keys=False)


def prepare_instance(home: Path) -> str | None:
    """Write `home`/dagster.yaml, or say what it lacks; returns a line to print, or None.

    A file you wrote or edited is never changed: only a missing one, or one exactly as an older
    chroma-demo wrote it, gets the demo's settings.
    """
    home.mkdir(parents=True, exist_ok=True)
    path = home / "dagster.yaml"
    if not path.exists():
        path.write_text(instance_yaml())
        return None
    if path.read_text() == OLDER_DEMO_INSTANCE:
        path.write_text(instance_yaml())
        return f"{path}: added run monitoring (a run whose worker died is marked failed; see README 'The Dagster UI')"
    try:
        present = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return None  # Dagster reports a broken file itself, with the line
    missing = [key for key in INSTANCE_SETTINGS if not (isinstance(present, dict) and key in present)]
    if missing:
        return (f"{path} has no {' or '.join(missing)} setting; left as it is. See README 'The Dagster UI' for "
                "the lines to add")
    return None


class _WithoutStackTraces(logging.Filter):
    """Drops the error text Dagster appends to a failure event's line (message, stack trace, causes).

    The demo prints the reason of a user error once at the end, or the whole traceback of an
    unexpected one; Dagster's copy of it on two event lines (step failure, run failure) would
    only bury that.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        event = getattr(record, "dagster_event", None)
        if getattr(getattr(event, "event_specific_data", None), "error", None) is not None:
            record.msg = record.getMessage().split("\n\n", 1)[0]  # the error text follows a blank line
            record.args = ()
        return True


@logger(description="Dagster's console log, each failure on one line (CHROMA_TRACEBACK=1: with its error)")
def brief_console(_init_context) -> logging.Logger:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s - dagster - %(levelname)s - %(message)s", "%Y-%m-%d %H:%M:%S %z"))
    if not traceback_wanted():
        handler.addFilter(_WithoutStackTraces())
    log = logging.Logger("dagster", level=logging.DEBUG)  # not registered globally: this run's log only
    log.addHandler(handler)
    return log


def browse_command(home: Path, config_path: Path) -> str:
    return dagster_dev_command({"DAGSTER_HOME": str(home), "CHROMA_CONFIG": str(config_path)})


def demo(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chroma-demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="chroma-demo", help="folder for the dataset, config and outputs")
    parser.add_argument("--images", type=int, default=DEMO_IMAGES, help="how many demo images to generate")
    args = parser.parse_args(argv)

    root = Path(args.root).resolve()
    config_path = write_demo(root, count=args.images)
    os.environ.setdefault("DAGSTER_HOME", str(root / ".dagster"))
    home = Path(os.environ["DAGSTER_HOME"]).resolve()
    note = prepare_instance(home)
    if note:
        print(note)

    from dagster import DagsterInstance

    from .definitions import materialize_chain

    started = time.perf_counter()
    result = materialize_chain(str(config_path), instance=DagsterInstance.get(), loggers={"console": brief_console})
    if not result.success:
        print("chroma-demo: the run did not succeed; see the log above", file=sys.stderr)
        return 1
    grid = result.asset_materializations_for_node("validation_grid")[0].metadata["grid path"].value
    print(f"\nThe whole chain (six steps, seven assets) materialized in {time.perf_counter() - started:.0f}s.")
    print(f"Validation grid: {grid}")
    print(f"Config: {config_path}")
    print(f"Browse the runs (from any folder): {browse_command(home, config_path)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The `chroma-demo` console script: a user error is one line, not a traceback."""
    return run_command(demo, "chroma-demo", argv)


if __name__ == "__main__":
    sys.exit(main())
