"""Start training on several processes or machines with `accelerate launch`.

The `lora_adapter` asset runs this on machine 0 (through Dagster Pipes). With
`num_machines` > 1, every other machine runs the same launch with its own rank:

    python -m chroma_pipeline.launch --config my-config.jsonc --machine-rank 1

All machines must see the same `output_dir` (a shared volume): the caches, the base model
and the checkpoints are read from it, and rank 0 writes the adapter there.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

from .config import ChromaConfig, load_config
from .errors import run_command


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_command(config_path: str, config: ChromaConfig, device: str, machine_rank: int | None = None) -> list[str]:
    """`accelerate launch` of `python -m chroma_pipeline.train` on this machine's share of the processes.

    `num_processes` counts this machine's processes (one GPU each; gloo on a CPU); accelerate
    counts all of them. One machine meets on a free local port, several on `main_process_ip:port`.
    """
    machine_rank = config.machine_rank if machine_rank is None else machine_rank
    several = config.num_machines > 1
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
        "--num_processes", str(config.num_processes * config.num_machines),
        "--num_machines", str(config.num_machines), "--machine_rank", str(machine_rank),
        "--main_process_ip", config.main_process_ip if several else "127.0.0.1",
        "--main_process_port", str(config.main_process_port if several else _free_port()),
        "--mixed_precision", "no", "--dynamo_backend", "no",  # our config decides precision, not accelerate's
        "-m", "chroma_pipeline.train", "--config", str(config_path), "--only-train", "--device", device,
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chroma_pipeline.launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the same config file machine 0 trains with")
    parser.add_argument("--machine-rank", type=int, required=True, help="this machine's number, 1 to num_machines - 1")
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu")
    args = parser.parse_args(argv)
    config = load_config(args.config, machine_rank=args.machine_rank)
    command = launch_command(args.config, config, args.device)
    print(" ".join(command), flush=True)
    os.execv(command[0], command)  # the launcher takes this process's place, so signals reach it directly
    return 0  # not reached


if __name__ == "__main__":
    raise SystemExit(run_command(main, "python -m chroma_pipeline.launch"))
