"""`loraflow train lora` at its defaults against plain TRL SFTTrainer at its defaults: speed and held-out quality.

Same base model, same data (data/pirate/train.jsonl), same number of optimizer steps. Each side keeps its own
defaults, which is what a user gets with no flags:
- loraflow: batch 4, lr 2e-4 cosine, LoRA r=8 on q/k/v/o without dropout, bf16 mixed precision with the frozen base
  in bf16 where bf16 is native (a bf16 GPU, a CPU with AVX512-BF16 or AMX) and fp32 elsewhere, no gradient
  checkpointing; on the CPU eager attention and TRL's plain nll loss;
- plain TRL 1.12: batch 8, lr 2e-5 linear, PEFT's default LoRA (r=8 on q/v), bf16, gradient checkpointing. Its only
  settings here are the step count, `use_cpu` (without it TRL refuses to start on a machine with no GPU) and no
  checkpoint saving or reporting.
Then `loraflow train lora --bf16 false` (the fp32 option), to show what bf16 adds. loraflow's default also holds
out 10% of the data to report an eval loss; here that is off (`eval_split 0`), so both sides only train.

Speed is non-padding tokens per second of the training loop (TRL's `num_tokens` over Trainer's `train_runtime`),
after one unmeasured warm-up each; the runners alternate (order reversed every other round) so machine noise hits
all alike. Quality, for the adapter of each runner's last round: the fraction of greedy answers to the 40 held-out
prompts that open with "Arr" (the metric of the README's quality table; the base scores 0.00), and the mean loss on
the held-out reference answers, which moves before the "Arr" rate does (lower is better).

    .venv/bin/python bench/train_throughput.py [--steps 20] [--rounds 2] [--base smollm2-135m]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from loraflow.arena.judge import is_pirate, prompts_from  # noqa: E402
from loraflow.hub.base import DEFAULT_BASE, resolve_base  # noqa: E402
from loraflow.hub.devices import fast_bf16, on_gpu  # noqa: E402

DATA = REPO / "data" / "pirate" / "train.jsonl"
HELDOUT = REPO / "data" / "pirate" / "heldout.jsonl"


def run_ours(steps: int, base_spec: str, workdir: Path, **settings) -> tuple[float, int, Path]:
    """Training-loop seconds, tokens trained on, and the adapter folder."""
    from loraflow.hub.registry import Registry
    from loraflow.hub.training import run_training
    from loraflow.plugins.lora import LoraTrainingConfig

    registry = Registry(workdir / "registry.json")
    version = run_training(
        "lora", data=DATA, name="bench", base_spec=base_spec, registry=registry,
        config=LoraTrainingConfig(max_steps=steps, **settings),
    )  # fmt: skip
    return version.metrics["train_runtime_s"], version.metrics["train_tokens"], registry.folder(version)


def run_plain(steps: int, base_spec: str, workdir: Path) -> tuple[float, int, Path]:
    """What a user writes with TRL alone, at TRL's defaults: the quickstart with a PEFT config."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    path = resolve_base(base_spec).path
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    dataset = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows])
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(path),
        args=SFTConfig(
            output_dir=str(workdir / "plain"),
            max_steps=steps,
            logging_steps=min(steps, 10),  # TRL's default 10, so the last log lands on the last step
            use_cpu=not on_gpu(),
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
        ),
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(path),
        peft_config=LoraConfig(task_type="CAUSAL_LM"),
    )
    runtime = trainer.train().metrics["train_runtime"]
    tokens = next(entry["num_tokens"] for entry in reversed(trainer.state.log_history) if "num_tokens" in entry)
    trainer.model.save_pretrained(workdir / "plain-adapter")
    return runtime, int(tokens), workdir / "plain-adapter"


def held_out_quality(base_spec: str, adapter: Path | None) -> tuple[float, float]:
    """The "Arr" rate of greedy answers to the held-out prompts, and the mean loss on their reference answers."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraflow.plugins.common import generate_answers

    path = resolve_base(base_spec).path
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    answers = generate_answers(model, tokenizer, prompts_from(HELDOUT), max_new_tokens=6)
    losses = []
    for line in HELDOUT.read_text().splitlines():
        messages = json.loads(line)["messages"]
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, return_dict=False)
        full = tokenizer.apply_chat_template(messages, return_dict=False)
        labels = torch.tensor([[-100] * len(prompt) + full[len(prompt) :]])
        with torch.no_grad():
            losses.append(model(input_ids=torch.tensor([full]), labels=labels).loss.item())
    return sum(map(is_pirate, answers)) / len(answers), statistics.mean(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run, the same for every runner")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--base", default=DEFAULT_BASE)
    args = parser.parse_args()

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        runners = {
            "loraflow lora (defaults)": lambda: run_ours(args.steps, args.base, workdir / "ours", eval_split=0.0),
            "plain TRL (defaults)": lambda: run_plain(args.steps, args.base, workdir / "plain"),
            "loraflow lora --bf16 false": lambda: run_ours(
                args.steps, args.base, workdir / "fp32", eval_split=0.0, bf16=False
            ),
        }
        for runner in runners.values():  # warm-up: first-run kernel setup and file caching, not measured
            runner()
        speeds: dict[str, list[float]] = {name: [] for name in runners}
        adapters: dict[str, Path] = {}
        for round_index in range(args.rounds):
            for name in list(runners) if round_index % 2 == 0 else list(reversed(list(runners))):
                seconds, tokens, adapters[name] = runners[name]()
                speeds[name].append(tokens / seconds)
                print(f"  round {round_index + 1} {name}: {tokens} tokens in {seconds:.2f} s", flush=True)
        quality = {name: held_out_quality(args.base, adapter) for name, adapter in adapters.items()}
        base_arr, base_loss = held_out_quality(args.base, None)
    native = "native" if fast_bf16() else "emulated (loraflow's default is fp32 here)"
    print(f"{args.steps} steps per run, {args.rounds} alternating rounds; bf16 on this machine: {native}")
    rate = {name: statistics.median(values) for name, values in speeds.items()}
    print(f"  held-out quality of the base: 'Arr' rate {base_arr:.2f}, answer loss {base_loss:.3f}")
    for name in runners:
        arr, loss = quality[name]
        print(f"  {name:28s} {rate[name]:7.1f} tok/s   held-out 'Arr' rate {arr:.2f}, answer loss {loss:.3f}")
    ours, plain, fp32 = runners
    print(
        f"ratio loraflow defaults / plain TRL defaults: {rate[ours] / rate[plain]:.2f}x tok/s; held-out answer loss "
        f"{quality[ours][1]:.3f} vs {quality[plain][1]:.3f}, 'Arr' {quality[ours][0]:.2f} vs {quality[plain][0]:.2f}"
    )
    print(f"ratio loraflow defaults / loraflow fp32: {rate[ours] / rate[fp32]:.2f}x tok/s")


if __name__ == "__main__":
    main()
