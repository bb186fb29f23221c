"""Start-up: how long a run with nothing to do takes, and what it spends the time importing.

Prepares a small project (9 generated images, the tiny flavour, 12 steps: tests/conftest.py's
`small_project`), runs `python -m chroma_pipeline.train` on it once to build every cache and the
adapter, then measures re-runs, where every cache is valid and the adapter is already trained:

- the import table of one re-run under `python -X importtime`: per heavy package, the cumulative
  time of its outermost imports (what importing it cost, its own dependencies included);
- the wall time of `--runs` fresh re-runs (interpreter start to exit): median and min-max;
- the same for loading the Dagster code location (`build_definitions` on the project's config).

Each process gets this project's own user cache (XDG_CACHE_HOME), filled by the first run.
Other work on the machine moves the figures: the load average is printed beside them.

    python benchmarks/startup.py [--runs 3] [--checkout DIR]

`--checkout` measures the code of another checkout of the project (a worktree at an older commit,
say) on the same project.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOAL_SECONDS = 3.0
HEAVY = ("torch", "diffusers", "transformers", "peft", "optimum", "accelerate", "dagster", "pandas", "pydantic",
         "pyarrow", "numpy", "PIL", "safetensors", "matplotlib", "datasets")
CODE_LOCATION = "from assets.definitions import build_definitions; build_definitions({config!r}, 'cpu')"


def parse_importtime(stderr: str) -> list[tuple[str, int, int, int]]:
    """(module, self µs, cumulative µs, depth) for every line of `-X importtime` output, in its order."""
    rows = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cumulative_us, name = line[len("import time:"):].split("|")
        depth = (len(name) - len(name.lstrip(" ")) - 1) // 2
        rows.append((name.strip(), int(self_us), int(cumulative_us), depth))
    return rows


def package_times(rows) -> tuple[dict[str, int], int, int]:
    """Per heavy package, the cumulative µs of its outermost imports; the heavy packages together
    (imports of one inside another counted once); and every import together (sum of self times).

    importtime prints a module after the modules it imported, one level deeper: a line's parent is
    the next line below it at a smaller depth.
    """
    per_package = dict.fromkeys(HEAVY, 0)
    together = 0
    enclosing: list[tuple[int, str]] = []  # (depth, package) of the lines enclosing the current one
    for name, _self_us, cumulative_us, depth in reversed(rows):
        while enclosing and enclosing[-1][0] >= depth:
            enclosing.pop()
        package = name.split(".")[0]
        outer = {p for _, p in enclosing}
        if package in per_package and package not in outer:
            per_package[package] += cumulative_us
            if not outer.intersection(HEAVY):
                together += cumulative_us
        enclosing.append((depth, package))
    return per_package, together, sum(row[1] for row in rows)


def run(command: list[str], env: dict, cwd: Path, check_output: str | None = None) -> tuple[float, subprocess.CompletedProcess]:
    """`cwd`: the project's folder, not a checkout: `python -m` and `-c` put the working folder first on
    sys.path, and the code must be PYTHONPATH's (the checkout measured)."""
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0 or (check_output and check_output not in done.stdout):
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return seconds, done


def timed_runs(command: list[str], env: dict, cwd: Path, runs: int, check_output: str | None = None) -> list[float]:
    return [run(command, env, cwd, check_output)[0] for _ in range(runs)]


def summary(seconds: list[float]) -> str:
    return f"{statistics.median(seconds):.1f} s ({min(seconds):.1f}–{max(seconds):.1f})"


def load() -> str:
    return "load average " + ", ".join(f"{value:.2f}" for value in os.getloadavg())


def import_table(stderr: str) -> None:
    per_package, together, everything = package_times(parse_importtime(stderr))
    for package, us in sorted(per_package.items(), key=lambda item: -item[1]):
        print(f"  {package:14s} {us / 1e6:6.2f} s" if us else f"  {package:14s}      - (not imported)")
    print(f"  {'heavy, together':14s} {together / 1e6:6.2f} s   every import: {everything / 1e6:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--checkout", type=Path, default=REPO, help="the checkout whose code runs (default: this one)")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    from chroma_pipeline.demo_data import demo_config, make_demo_dataset

    with tempfile.TemporaryDirectory(prefix="startup-") as folder:
        root = Path(folder)
        make_demo_dataset(root / "dataset", count=9)
        values = demo_config(root / "dataset", root / "output")
        values.update(max_train_steps=12, validation_num_inference_steps=4, validation_seed=[7])
        config = root / "config.json"
        config.write_text(json.dumps(values, indent=2))
        env = {**os.environ, "PYTHONPATH": str(args.checkout.resolve()), "HF_HUB_OFFLINE": "1",
               "XDG_CACHE_HOME": str(root / "user-cache")}
        cli = [sys.executable, "-m", "chroma_pipeline.train", "--config", str(config), "--device", "cpu"]
        location = [sys.executable, "-c", CODE_LOCATION.format(config=str(config))]

        print(f"code: {args.checkout.resolve()}; {os.cpu_count()} CPUs; {load()}")
        seconds, _ = run(cli, env, root)
        print(f"first run (tiny model, caches, 12 training steps): {seconds:.1f} s")

        _, traced = run([sys.executable, "-X", "importtime", *cli[1:]], env, root, "reusing trained adapter")
        print("warm no-op CLI run, import time per package (-X importtime, cumulative):")
        import_table(traced.stderr)
        _, traced = run([sys.executable, "-X", "importtime", *location[1:]], env, root)
        print("code location load, import time per package:")
        import_table(traced.stderr)

        print(f"{load()} before the timed runs")
        location_seconds = timed_runs(location, env, root, args.runs)
        cli_seconds = timed_runs(cli, env, root, args.runs, "reusing trained adapter")
        print(f"{load()} after them")
        print(f"code location load (build_definitions, fresh process): {summary(location_seconds)}, "
              f"runs {', '.join(f'{s:.2f}' for s in location_seconds)}")
        print(f"warm no-op CLI runs: {', '.join(f'{s:.2f}' for s in cli_seconds)} s")
        print(f"warm no-op CLI run: {summary(cli_seconds)}, goal ≤ {GOAL_SECONDS:g} s")


if __name__ == "__main__":
    main()
