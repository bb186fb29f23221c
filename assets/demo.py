"""`chroma-demo`: generate the demo dataset and materialize the whole chain through Dagster.

Runs are recorded in $DAGSTER_HOME (default: <root>/.dagster), so `dagster dev` with the
same DAGSTER_HOME shows the demo's materializations afterwards.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from chroma_pipeline.demo_data import write_demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="chroma-demo", help="folder for the dataset, config and outputs")
    parser.add_argument("--images", type=int, default=36, help="how many demo images to generate")
    args = parser.parse_args(argv)

    root = Path(args.root).resolve()
    config_path = write_demo(root, count=args.images)
    os.environ.setdefault("DAGSTER_HOME", str(root / ".dagster"))
    home = Path(os.environ["DAGSTER_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        # One run at a time: a run you launch and one the automation sensor launches must not
        # share one accelerator (or the CPU) side by side.
        (home / "dagster.yaml").write_text("run_queue:\n  max_concurrent_runs: 1\n")

    from dagster import DagsterInstance

    from .definitions import materialize_chain

    started = time.perf_counter()
    result = materialize_chain(str(config_path), instance=DagsterInstance.get())
    if not result.success:
        print("demo failed; see the log above", file=sys.stderr)
        return 1
    grid = result.asset_materializations_for_node("validation_grid")[0].metadata["grid path"].value
    print(f"\nThe whole chain (six steps, seven assets) materialized in {time.perf_counter() - started:.0f}s.")
    print(f"Validation grid: {grid}")
    print(f"Config: {config_path}")
    print(f"Browse the runs: DAGSTER_HOME={os.environ['DAGSTER_HOME']} CHROMA_CONFIG={config_path} dagster dev")
    return 0


if __name__ == "__main__":
    sys.exit(main())
