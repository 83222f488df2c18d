"""Peak resident memory (RSS) of `qlora` against `lora` on the same run, each in its own fresh process.

.venv/bin/python bench/train_memory.py [--steps 6] [--base smollm2-135m]
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

CHILD = """
import json, resource, sys
sys.path.insert(0, {repo!r})
from loraflow.hub.plugins import get_plugins
from loraflow.hub.registry import Registry
from loraflow.hub.training import load_config, run_training
method, steps, base, folder = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
config = load_config(get_plugins().trainer(method).trainer_class.config_class, overrides=dict(
    max_steps=steps, per_device_train_batch_size=8, max_length=128, eval_split=0.0, gradient_checkpointing=True))
registry = Registry(folder + "/registry.json")
run_training(method, data={data!r}, name="mem-" + method, base_spec=base, registry=registry, config=config)
print("PEAK_RSS_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss_mib(method: str, steps: int, base: str) -> float:
    with tempfile.TemporaryDirectory() as folder:
        code = CHILD.format(repo=str(REPO), data=str(REPO / "data/pirate/train.jsonl"))
        output = subprocess.run(
            [sys.executable, "-c", code, method, str(steps), base, folder], capture_output=True, text=True, check=True
        ).stdout
    return int(output.split("PEAK_RSS_KIB")[1].split()[0]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--base", default=DEFAULT_BASE)
    args = parser.parse_args()
    peaks = {method: peak_rss_mib(method, args.steps, args.base) for method in ("lora", "qlora")}
    for method, mib in peaks.items():
        print(f"  {method:6s} peak RSS {mib:8.1f} MiB")
    print(
        f"ratio qlora/lora peak RSS: {peaks['qlora'] / peaks['lora']:.3f}x ({args.steps} steps, batch 8, gradient "
        "checkpointing on both)"
    )
    print(json.dumps(peaks))


if __name__ == "__main__":
    main()
