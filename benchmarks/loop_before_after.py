"""Per-step time of our training loop at two commits, side by side (did a change make the loop slower?).

Both commits train on the same project (benchmarks/training.py's mid-size random Chroma, rank-16
LoRA, batch 2, fp32 on CPU) through their own `benchmarks/training.py --mode ours`, each run in a
fresh process, alternating A, B, A, B, ...; the figure is each side's median seconds per step
(after the warm-up steps) over the runs, with the spread (min-max) of those runs.

    python benchmarks/loop_before_after.py --before 6c0cc6f [--after HEAD] [--runs 3] [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def checkout(ref: str, folder: Path) -> Path:
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-f", str(folder), ref], check=True,
                   capture_output=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="a git ref")
    parser.add_argument("--after", default="HEAD")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "benchmarks"))
    from training import prepare  # the project both sides train on, built once

    with tempfile.TemporaryDirectory(prefix="chroma-loop-ab-") as tmp:
        trees = {name: checkout(ref, Path(tmp) / name) for name, ref in (("before", args.before), ("after", args.after))}
        try:
            config = prepare(Path(tmp) / "project")
            times: dict[str, list[float]] = {"before": [], "after": []}
            for _ in range(args.runs):
                for name, tree in trees.items():
                    child = subprocess.run(
                        [sys.executable, str(tree / "benchmarks" / "training.py"), "--mode", "ours", "--config",
                         str(config), "--steps", str(args.steps)],
                        cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True,
                    )
                    if child.returncode:
                        raise SystemExit(f"{name} failed:\n{child.stderr[-3000:]}")
                    times[name].append(json.loads(child.stdout.strip().splitlines()[-1])["per_step"])
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], capture_output=True)
    load = os.getloadavg()
    print(f"our loop, {args.steps} steps per run, {args.runs} alternating fresh-process runs per side; "
          f"load average at the end {load[0]:.2f} on {os.cpu_count()} CPUs")
    medians = {}
    for name, ref in (("before", args.before), ("after", args.after)):
        runs = times[name]
        medians[name] = statistics.median(runs)
        print(f"{name:<7} {ref:<12} median {medians[name]:.4f} s/step  (runs: {', '.join(f'{t:.4f}' for t in runs)}; "
              f"spread {min(runs):.4f}-{max(runs):.4f})")
    print(f"after / before: {medians['after'] / medians['before']:.3f}x")


if __name__ == "__main__":
    main()
