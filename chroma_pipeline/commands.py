"""Commands the command-line tools print for the user to run next, written to work from any folder."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

CODE_LOCATION = "assets.definitions"  # the module workspace.yaml names


def dagster_dev_command(env: dict[str, str]) -> str:
    """`dagster dev` on this project's code location, with `env` set, runnable from any folder.

    A bare `dagster dev` reads workspace.yaml from the current folder, so it works only at the
    repository root. `-m` names the module instead, and `-d` the folder that holds its package:
    Dagster puts that folder first on the import path, so a folder named `assets` in the current
    folder cannot shadow ours. The `dagster` beside this Python is named by its path, so the
    command works without activating the virtual environment.
    """
    dagster = Path(sys.executable).with_name("dagster")  # not resolved: a venv's python is a symlink
    program = str(dagster) if dagster.exists() else "dagster"
    words = [f"{key}={shlex.quote(str(value))}" for key, value in env.items()]
    words += [shlex.quote(program), "dev", "-m", CODE_LOCATION]
    # The distribution installs `assets` beside this package (site-packages, or the checkout for
    # an editable install); found from here, not from sys.path, where the current folder comes first.
    package_parent = Path(__file__).resolve().parents[1]
    if (package_parent / Path(*CODE_LOCATION.split("."))).with_suffix(".py").is_file():
        words += ["-d", shlex.quote(str(package_parent))]
    return " ".join(words)
