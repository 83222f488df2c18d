"""`accelerate launch --multi_gpu --num_processes 2` runs tiny trainings as two data-parallel CPU processes.

With `--cpu`, accelerate 1.x starts a single process (its simple launcher) unless MPI is set up; `--multi_gpu`
goes through torch.distributed's launcher, and on a machine without GPUs the processes train on the CPU (gloo).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import PIRATE, REPO

LAUNCH = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
    "-m",
    "loraflow.hub.cli",
]


# What both trainings share to stay small: two examples per device, no eval split, 96 tokens, LoRA rank 2.
TINY_TRAINING = ["--per-device-train-batch-size", "2", "--eval-split", "0", "--max-length", "96", "--lora-r", "2"]


def first_lines(source: Path, folder: Path, count: int) -> Path:
    data = folder / source.name
    data.write_text("".join(source.read_text().splitlines(keepends=True)[:count]))
    return data


def launch_training(registry_file: Path, trainer: str, data: Path, name: str, base: Path, *flags: str) -> None:
    """`loraflow train TRAINER` on `data` under accelerate, kept tiny (see TINY_TRAINING), with any extra `flags`."""
    inputs = ["--data", str(data), "--name", name, "--base", str(base)]
    command = [*LAUNCH, "--registry", str(registry_file), "train", trainer, *inputs, *TINY_TRAINING, *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-4000:]


def test_accelerate_launch_two_processes_publishes_once(tiny_base, tmp_path):
    registry_file = tmp_path / "registry.json"
    launch_training(registry_file, "lora", first_lines(PIRATE / "train.jsonl", tmp_path, 16), "ddp", tiny_base.path)
    versions = json.loads(registry_file.read_text())["adapters"]["ddp"]["versions"]
    assert list(versions) == ["1"], "only the main process publishes"
    # 16 examples, 2 per device: one process takes 8 steps, two processes share them in 4.
    assert versions["1"]["metrics"]["train_steps"] == 4


def test_accelerate_launch_ppo_publishes_the_policy_and_its_reward_model_once(tiny_base, tmp_path):
    registry_file = tmp_path / "registry.json"
    launch_training(
        registry_file,
        "ppo",
        first_lines(PIRATE / "prefs.jsonl", tmp_path, 8),
        "rl",
        tiny_base.path,
        "--lora-alpha",
        "4",
        "--reward-max-steps",
        "1",
        "--total-episodes",
        "4",
        "--response-length",
        "4",
        "--num-ppo-epochs",
        "1",
    )
    adapters = json.loads(registry_file.read_text())["adapters"]
    assert sorted(adapters) == ["rl", "rl-reward"]
    assert list(adapters["rl"]["versions"]) == ["1"] and list(adapters["rl-reward"]["versions"]) == ["1"]
    reward, policy = adapters["rl-reward"]["versions"]["1"], adapters["rl"]["versions"]["1"]
    assert reward["kind"] == "reward" and policy["kind"] == "adapter"
    assert policy["metrics"]["reward_model"] == "rl-reward@1"
