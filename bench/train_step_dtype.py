"""One LoRA training step of the base in fp32, under bf16 autocast, and with bf16 weights under autocast.

What `loraflow train`'s bf16 default (on where bf16 is native) buys, without a Trainer around it: forward and
backward of one batch of 4 pirate examples through a PEFT LoRA (r 8, q/k/v/o), the three settings alternating
(order reversed every other round) after one warm-up each. `--threads 1` keeps other jobs on a shared machine
from distorting the comparison.

    .venv/bin/python bench/train_step_dtype.py [--rounds 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from loraflow.hub.base import DEFAULT_BASE, resolve_base  # noqa: E402
from loraflow.hub.devices import fast_bf16  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--base", default=DEFAULT_BASE)
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_base(args.base).path
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = [json.loads(line) for line in (REPO / "data/pirate/train.jsonl").read_text().splitlines()[:4]]
    batch = tokenizer(
        [tokenizer.apply_chat_template(row["messages"], tokenize=False) for row in rows],
        return_tensors="pt",
        padding=True,
    )
    lora = LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
    models = {
        dtype: get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=dtype), lora)
        for dtype in (torch.float32, torch.bfloat16)
    }
    settings = {
        "fp32": (torch.float32, False),
        "fp32 weights, bf16 autocast (loraflow's bf16)": (torch.float32, True),
        "bf16 weights, bf16 autocast (TRL's default load)": (torch.bfloat16, True),
    }

    def step(label: str) -> float:
        dtype, autocast = settings[label]
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = models[dtype](**batch, labels=batch["input_ids"]).loss
        loss.backward()
        return time.perf_counter() - started

    for label in settings:
        step(label)
    seconds: dict[str, list[float]] = {label: [] for label in settings}
    for round_index in range(args.rounds):
        for label in list(settings) if round_index % 2 == 0 else list(reversed(list(settings))):
            seconds[label].append(step(label))
    median = {label: statistics.median(values) for label, values in seconds.items()}
    print(f"bf16 native here: {fast_bf16()}; threads {torch.get_num_threads()}; {args.rounds} alternating rounds")
    for label, value in median.items():
        print(f"  {label:50s} {value:6.3f} s per step")
    fp32, autocast, bf16 = median.values()
    print(f"ratio fp32 / bf16 autocast: {fp32 / autocast:.2f}x; fp32 / bf16 weights + autocast: {fp32 / bf16:.2f}x")


if __name__ == "__main__":
    main()
