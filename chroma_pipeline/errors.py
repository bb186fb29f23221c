"""User errors, and how the command-line entry points report them.

A user error is something the user fixes (a setting, a file, the machine), and its message says
what and how. Under a traceback that message is the last of 20 to 200 lines, and Dagster prints
it once more in its own log; so the commands print it alone, once, and exit with 1. Any other
exception is a bug and keeps its traceback. `CHROMA_TRACEBACK=1` keeps it for user errors too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

TRACEBACK_ENV = "CHROMA_TRACEBACK"


class UserError(Exception):
    """A problem with the user's settings, files or machine; the message says what to do."""


class DeviceUnavailable(UserError, RuntimeError):
    """The device asked for (or a setting that needs one) is not on this machine."""


class DoesNotFit(UserError, MemoryError):
    """The memory estimate says the step cannot run here; raised before anything is loaded."""


class DatasetError(UserError, ValueError):
    """The dataset cannot be used as configured (no usable sample, ambiguous metadata, ...)."""


def failure_reason(exc: BaseException | None) -> str | None:
    """The message of the user error behind `exc`, or None when there is none (a bug: keep its traceback).

    A missing file counts: its message names the file. Dagster wraps what a step or a resource
    raised in its own error (`user_exception` holds the original, `step_key` the step), or,
    running in process, re-raises the original while handling its own; either way the reason
    then starts with the step.
    """
    step, seen = None, set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (UserError, FileNotFoundError)):
            step = step or getattr(exc.__context__, "step_key", None)
            return f"{step}: {exc}" if step else str(exc)
        step = getattr(exc, "step_key", None) or step
        exc = getattr(exc, "user_exception", None)
    return None


def traceback_wanted() -> bool:
    return os.environ.get(TRACEBACK_ENV, "").strip().lower() not in ("", "0", "false", "no")


def run_command(main: Callable[[list[str] | None], int], prog: str, argv: list[str] | None = None) -> int:
    """`main(argv)`, with a user error printed as one `prog: error: ...` message (exit status 1)."""
    try:
        return main(argv)
    except Exception as exc:
        reason = failure_reason(exc)
        if reason is None or traceback_wanted():
            raise
        print(f"{prog}: error: {reason}", file=sys.stderr)
        print(f"  ({TRACEBACK_ENV}=1 shows where it happened)", file=sys.stderr)
        return 1
