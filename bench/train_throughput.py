"""Tokens per second of `loraflow train lora` against plain TRL SFTTrainer: same model, data and settings.

After one unmeasured warm-up run each, the runners alternate in one process (order reversed every other round),
so machine noise hits all alike. Two figures each:
the training loop (Trainer's own train_runtime) and the whole call (model load, validation, card, publish).
Both in fp32 (our default) and in bf16 mixed precision (TRL's default: bf16=True unless told otherwise).
Then plain TRL with packing (best-fit decreasing, padding-free) shows what packing would add. The bf16 rows run
only where bf16 is native (a bf16 GPU, or a CPU with AVX512-BF16 or AMX): on an AVX2-only CPU PyTorch emulates
bf16, about 80x slower per matmul, and they would take hours (`--bf16 always` runs them anyway).

    .venv/bin/python bench/train_throughput.py [--rounds 2] [--examples 96] [--base smollm2-135m]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from loraflow.hub.base import DEFAULT_BASE  # noqa: E402
from loraflow.hub.devices import fast_bf16  # noqa: E402

SETTINGS = dict(
    per_device_train_batch_size=8,
    max_length=128,
    eval_split=0.0,
    num_train_epochs=1.0,
    lr_scheduler_type="constant",
    warmup_ratio=0.0,
)


def run_ours(data: Path, base_spec: str, workdir: Path, bf16: bool = False) -> tuple[float, float]:
    from loraflow.hub.registry import Registry
    from loraflow.hub.training import run_training
    from loraflow.plugins.lora import LoraTrainingConfig

    start = time.perf_counter()
    version = run_training(
        "lora",
        data=data,
        name="bench",
        base_spec=base_spec,
        registry=Registry(workdir / "registry.json"),
        config=LoraTrainingConfig(**SETTINGS, bf16=bf16),
    )
    return version.metrics["train_runtime_s"], time.perf_counter() - start


def run_plain(data: Path, base_spec: str, workdir: Path, bf16: bool = False, **extra) -> tuple[float, float]:
    """What a user writes with TRL alone, with the settings our trainer passes."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from loraflow.hub.base import resolve_base

    start = time.perf_counter()
    path = resolve_base(base_spec).path
    rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    dataset = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows])
    tokenizer = AutoTokenizer.from_pretrained(path)
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
        args=SFTConfig(
            output_dir=str(workdir / "plain"),
            learning_rate=2e-4,
            lr_scheduler_type="constant",
            num_train_epochs=1,
            per_device_train_batch_size=8,
            max_length=128,
            completion_only_loss=True,
            seed=42,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=True,
            gradient_checkpointing=False,
            dataloader_pin_memory=False,
            bf16=bf16,
            **extra,
        ),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=0.05,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            task_type="CAUSAL_LM",
        ),
    )
    runtime = trainer.train().metrics["train_runtime"]
    trainer.model.save_pretrained(workdir / "plain-adapter")
    return runtime, time.perf_counter() - start


def count_tokens(data: Path, base_spec: str) -> int:
    from transformers import AutoTokenizer

    from loraflow.hub.base import resolve_base

    tokenizer = AutoTokenizer.from_pretrained(resolve_base(base_spec).path)
    rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    return sum(len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=False)) for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--examples", type=int, default=96, help="training examples per run (one epoch)")
    parser.add_argument("--base", default=DEFAULT_BASE)
    parser.add_argument("--bf16", choices=("auto", "always"), default="auto", help="auto: only where bf16 is native")
    args = parser.parse_args()
    with_bf16 = args.bf16 == "always" or fast_bf16()

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        data = workdir / "train.jsonl"
        data.write_text("\n".join((REPO / "data/pirate/train.jsonl").read_text().splitlines()[: args.examples]) + "\n")
        tokens = count_tokens(data, args.base)
        runners = {
            "loraflow lora": lambda: run_ours(data, args.base, workdir),
            "plain TRL": lambda: run_plain(data, args.base, workdir),
        }
        if with_bf16:
            runners["loraflow lora --bf16"] = lambda: run_ours(data, args.base, workdir, bf16=True)
            runners["plain TRL bf16"] = lambda: run_plain(data, args.base, workdir, bf16=True)
        for runner in runners.values():  # warm-up: first-run kernel setup and file caching, not measured
            runner()
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
        for round_index in range(args.rounds):
            # Reversed every other round, so no runner always goes first.
            for name in list(runners) if round_index % 2 == 0 else list(reversed(list(runners))):
                results[name].append(runners[name]())
                print(
                    f"  round {round_index + 1} {name}: training loop {results[name][-1][0]:.2f} s, whole call "
                    f"{results[name][-1][1]:.2f} s",
                    flush=True,
                )
        if with_bf16:
            results["plain TRL bf16 + packing"] = [run_plain(data, args.base, workdir, bf16=True, packing=True)]
        print(
            f"{tokens} tokens per run ({args.examples} examples, batch 8, one epoch), {args.rounds} alternating rounds"
        )
        loop = {name: tokens / statistics.median(r[0] for r in runs) for name, runs in results.items()}
        whole = {name: tokens / statistics.median(r[1] for r in runs) for name, runs in results.items()}
        for name in results:
            print(f"  {name:22s} training loop {loop[name]:8.1f} tok/s   whole call {whole[name]:8.1f} tok/s")
        pairs = [("loraflow lora", "plain TRL")]
        if with_bf16:
            pairs.append(("loraflow lora --bf16", "plain TRL bf16"))
        for ours, plain in pairs:
            print(
                f"ratio {ours} / {plain}: training loop {loop[ours] / loop[plain]:.3f}x, whole call "
                f"{whole[ours] / whole[plain]:.3f}x"
            )
        if not with_bf16:
            print("bf16 rows skipped: this machine emulates bf16 (no AVX512-BF16, AMX or bf16 GPU); --bf16 always")
            return
        print(f"ratio bf16/fp32 (loraflow, training loop): {loop['loraflow lora --bf16'] / loop['loraflow lora']:.3f}x")
        print(
            "ratio packing/no packing (plain TRL bf16, training loop): "
            f"{loop['plain TRL bf16 + packing'] / loop['plain TRL bf16']:.3f}x"
        )


if __name__ == "__main__":
    main()
