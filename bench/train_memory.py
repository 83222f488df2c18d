"""Resident memory (RSS) of `qlora` against `lora` on the same run, each in its own fresh process.

.venv/bin/python bench/train_memory.py [--steps 6] [--base smollm2-135m]

Inside each child, around the trainer's `load_model`: RSS before loading (torch, transformers, TRL, the tokenizer and
the data already in), RSS after loading and reading every weight once (their difference is the model-attributable load),
the peak while loading, the training peak (the high-water mark from the end of loading to the end of training; "peak-
before" is that less the RSS before loading) and the whole-process peak. The high-water mark is reset before and after
loading through /proc/self/clear_refs (Linux), so load transients and the training peak show separately.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from loraflow.hub.base import DEFAULT_BASE

REPO = Path(__file__).resolve().parent.parent
METHODS = ("lora", "qlora")

CHILD = """
import gc, json, sys
import torch
sys.path.insert(0, {repo!r})
from loraflow.hub.plugins import get_plugins
from loraflow.hub.registry import Registry
from loraflow.hub.training import load_config, run_training

def status_mib(key):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(key + ":")) / 1024

def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False

method, steps, base, folder = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
trainer_class = get_plugins().trainer(method).trainer_class
memory = {{}}
original_load_model = trainer_class.load_model

def measured_load_model(self, job):
    gc.collect()
    memory["before"] = status_mib("VmRSS")
    memory["preload_peak"] = status_mib("VmHWM")
    reset_peak()
    model = original_load_model(self, job)
    # Read every weight once: a checkpoint loaded in its own dtype (lora's frozen bf16 base) stays a mapping of the
    # file until first used, and RSS counts it only then, in the training peak.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.sum()
    gc.collect()
    memory["loaded"] = status_mib("VmRSS")
    memory["load_peak"] = status_mib("VmHWM")
    memory["peak_was_reset"] = reset_peak()
    return model

trainer_class.load_model = measured_load_model
config = load_config(trainer_class.config_class, overrides=dict(
    max_steps=steps, per_device_train_batch_size=8, max_length=128, eval_split=0.0, gradient_checkpointing=True))
registry = Registry(folder + "/registry.json")
run_training(method, data={data!r}, name="mem-" + method, base_spec=base, registry=registry, config=config)
memory["train_peak"] = status_mib("VmHWM")
memory["process_peak"] = max(memory["preload_peak"], memory["load_peak"], memory["train_peak"])
print("MEMORY_JSON", json.dumps(memory))
"""


def measure(method: str, steps: int, base: str) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        code = CHILD.format(repo=str(REPO), data=str(REPO / "data/pirate/train.jsonl"))
        child = subprocess.run(
            [sys.executable, "-c", code, method, str(steps), base, folder], capture_output=True, text=True
        )
    if child.returncode != 0:
        sys.exit(f"{method} failed (exit {child.returncode}):\n{child.stderr[-4000:]}")
    memory = json.loads(child.stdout.split("MEMORY_JSON", 1)[1].splitlines()[0])
    memory["load"] = memory["loaded"] - memory["before"]
    memory["train_over_before"] = memory["train_peak"] - memory["before"]
    return memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--base", default=DEFAULT_BASE)
    args = parser.parse_args()
    results = {method: measure(method, args.steps, args.base) for method in METHODS}
    print(
        f"{'method':6s} {'before':>8s} {'loaded':>8s} {'load':>8s} {'load peak':>10s} {'train peak':>11s} "
        f"{'peak-before':>12s} {'process peak':>13s}  (MiB RSS)"
    )
    for method, memory in results.items():
        print(
            f"{method:6s} {memory['before']:8.1f} {memory['loaded']:8.1f} {memory['load']:8.1f} "
            f"{memory['load_peak']:10.1f} {memory['train_peak']:11.1f} {memory['train_over_before']:12.1f} "
            f"{memory['process_peak']:13.1f}"
        )
    lora, qlora = results["lora"], results["qlora"]
    setting = f"({args.steps} steps, batch 8, max_length 128, gradient checkpointing on both)"
    print(f"ratio qlora/lora model-attributable load (RSS after - before loading): {qlora['load'] / lora['load']:.3f}x")
    print(
        "ratio qlora/lora training peak - RSS before loading: "
        f"{qlora['train_over_before'] / lora['train_over_before']:.3f}x"
    )
    print(f"ratio qlora/lora whole-process peak RSS: {qlora['process_peak'] / lora['process_peak']:.3f}x {setting}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
