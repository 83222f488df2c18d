"""`accelerate launch --multi_gpu --num_processes 2` runs a tiny lora training as two data-parallel CPU processes.

With `--cpu`, accelerate 1.x starts a single process (its simple launcher) unless MPI is set up; `--multi_gpu`
goes through torch.distributed's launcher, and on a machine without GPUs the processes train on the CPU (gloo).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import PIRATE, REPO


def test_accelerate_launch_two_processes_publishes_once(tiny_base, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join((PIRATE / "train.jsonl").read_text().splitlines(keepends=True)[:16]))
    registry_file = tmp_path / "registry.json"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "hub.cli",
        "--registry", str(registry_file), "train", "lora", "--data", str(data), "--name", "ddp", "--base", str(tiny_base.path),
        "--per-device-train-batch-size", "2", "--eval-split", "0", "--max-length", "96", "--lora-r", "2",
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    versions = json.loads(registry_file.read_text())["adapters"]["ddp"]["versions"]
    assert list(versions) == ["1"], "only the main process publishes"
    # 16 examples, 2 per device: one process takes 8 steps, two processes share them in 4.
    assert versions["1"]["metrics"]["train_steps"] == 4
