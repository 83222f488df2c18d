"""DPO throughput: `loraflow train dpo` at its defaults against plain TRL DPOTrainer, side by side in one run.

Same base (SmolLM2-135M), same new LoRA adapter (r 8, alpha 16, q/k/v/o), same preference pairs (data/pirate),
same number of optimizer steps. Each side is one whole call: model load, TRL's dataset preparation, the reference
log-probs, training, saving the adapter. The rows:

- loraflow: the `dpo` plugin at its defaults (bf16 mixed precision where bf16 is native, fp32 elsewhere, batch 4,
  lr 5e-5);
- TRL defaults: DPOConfig() with only use_cpu=True added where there is no GPU (bf16, gradient checkpointing,
  batch 8, lr 1e-6, max_length 1024), as a user who reaches for TRL gets it;
- TRL, our settings: DPOConfig with the plugin's own arguments, so the ratio shows what the plugin adds or saves
  over plain TRL with the same settings.

Rounds alternate between the runners after one warm-up each; throughput is pairs (and tokens) per second of the
whole call, median over rounds. Held-out quality beside it: DPO's implicit reward accuracy and margin on 40 pairs
not trained on (the trained adapter against the untrained one). On an AVX2-only CPU bf16 is emulated, so the TRL
defaults row gets few steps (--trl-steps).

    .venv/bin/python bench/dpo_throughput.py --steps 8 --trl-steps 2 --rounds 2
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
HELD_OUT = 40


def pairs_file(folder: Path, records: list[dict]) -> Path:
    path = folder / "prefs.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def loraflow_job(base, records: list[dict], steps: int, folder: Path):
    from loraflow.hub.training import TrainJob
    from loraflow.plugins.dpo import DpoTrainingConfig

    config = DpoTrainingConfig(max_steps=steps, eval_split=0.0)
    return TrainJob(base=base, config=config, name="bench", train_records=records, eval_records=[], output_dir=folder)


def run_loraflow(base, records: list[dict], steps: int, folder: Path) -> tuple[Path, int]:
    from loraflow.plugins.dpo import DpoTrainer

    job = loraflow_job(base, records, steps, folder)
    result = DpoTrainer().train(job)
    return result.adapter_dir, steps * job.config.per_device_train_batch_size


def run_trl(base, records: list[dict], steps: int, folder: Path, ours: bool) -> tuple[Path, int]:
    """Plain TRL: DPOTrainer on a new adapter, at TRL's defaults or with the plugin's arguments."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from loraflow.hub.devices import on_gpu
    from loraflow.plugins.common import load_causal_lm, lora_config, preference_to_conversation, trainer_arguments

    job = loraflow_job(base, records, steps, folder)
    if ours:
        config = job.config
        arguments = {**trainer_arguments(job), "max_length": config.max_length, "beta": config.beta}
        arguments["loss_type"] = [config.loss_type]
    else:
        arguments = {"output_dir": str(folder / "checkpoints"), "max_steps": steps, "report_to": "none"}
        arguments |= {"save_strategy": "no", "disable_tqdm": True, "use_cpu": not on_gpu()}
    args = DPOConfig(**arguments)
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    trainer = DPOTrainer(
        # TRL's defaults row loads the model as a plain call does; ours as the plugin does.
        model=load_causal_lm(job) if ours else AutoModelForCausalLM.from_pretrained(base.path),
        args=args,
        train_dataset=Dataset.from_list(preference_to_conversation(records)),
        processing_class=tokenizer,
        peft_config=lora_config(job.config),
    )
    trainer.train()
    trainer.model.save_pretrained(folder / "adapter")
    return folder / "adapter", steps * args.per_device_train_batch_size


def held_out_quality(base, adapter_dir: Path, records: list[dict]) -> tuple[float, float]:
    """Implicit reward accuracy and mean margin (beta 0.1) of the trained adapter against the untrained one."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.trainer.utils import selective_log_softmax

    def completion_logps(model, batch: dict):
        """Each row's summed log-probs of its completion tokens (TRL's collator marks them in completion_mask)."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        per_token = selective_log_softmax(logits[:, :-1], batch["input_ids"][:, 1:])
        return (per_token * batch["completion_mask"][:, 1:]).sum(dim=1)

    tokenizer = AutoTokenizer.from_pretrained(base.path)
    examples = []
    for record in records:
        turn = [{"role": "user", "content": record["prompt"]}]
        prompt = tokenizer.apply_chat_template(turn, add_generation_prompt=True, return_dict=True)["input_ids"]
        answers = {}
        for side in ("chosen", "rejected"):
            full = turn + [{"role": "assistant", "content": record[side]}]
            answers[side] = tokenizer.apply_chat_template(full, return_dict=True)["input_ids"][len(prompt) :]
        examples.append({"prompt_ids": prompt, "chosen_ids": answers["chosen"], "rejected_ids": answers["rejected"]})
    batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)(examples)
    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    with torch.no_grad():
        policy = completion_logps(model, batch)
        with model.disable_adapter():  # the adapter starts from zero, so the untrained one is the bare base
            reference = completion_logps(model, batch)
    chosen, rejected = ((policy - reference) * 0.1).float().chunk(2)
    return (chosen > rejected).float().mean().item(), (chosen - rejected).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="Optimizer steps for loraflow and TRL-our-settings.")
    parser.add_argument("--trl-steps", type=int, default=4, help="Optimizer steps for TRL at its defaults.")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import torch

    from loraflow.hub.base import DEFAULT_BASE, resolve_base
    from loraflow.hub.devices import fast_bf16

    base = resolve_base(DEFAULT_BASE)
    lines = (REPO / "data/pirate/prefs.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    train, held_out = records[:-HELD_OUT], records[-HELD_OUT:]
    runners = {
        "loraflow dpo (defaults)": lambda steps, folder: run_loraflow(base, train, steps, folder),
        "TRL DPOTrainer (defaults)": lambda steps, folder: run_trl(base, train, steps, folder, ours=False),
        "TRL DPOTrainer (our settings)": lambda steps, folder: run_trl(base, train, steps, folder, ours=True),
    }
    steps = {name: args.trl_steps if "TRL DPOTrainer (defaults)" in name else args.steps for name in runners}
    print(f"threads {torch.get_num_threads()}, native bf16 {fast_bf16()}, steps {steps}", flush=True)
    root = Path(tempfile.mkdtemp(prefix="dpo-throughput-"))
    for name, runner in runners.items():  # warm-up: imports, caches, first allocations
        runner(1, root / f"warmup-{len(list(root.iterdir()))}")
    rates: dict[str, list[float]] = {name: [] for name in runners}
    adapters: dict[str, Path] = {}
    for round_number in range(args.rounds):
        order = list(runners) if round_number % 2 == 0 else list(reversed(runners))
        for name in order:
            folder = root / f"{round_number}-{len(list(root.iterdir()))}"
            started = time.perf_counter()
            adapters[name], pairs = runners[name](steps[name], folder)
            seconds = time.perf_counter() - started
            rates[name].append(pairs / seconds)
            print(f"round {round_number} {name:<30} {pairs} pairs in {seconds:6.1f} s: {pairs / seconds:.3f} pairs/s")
    ours = statistics.median(rates["loraflow dpo (defaults)"])
    for name in runners:
        accuracy, margin = held_out_quality(base, adapters[name], held_out)
        rate = statistics.median(rates[name])
        print(
            f"{name:<30} {rate:.3f} pairs/s over {steps[name]} steps; held-out ({HELD_OUT} pairs) "
            f"reward accuracy {accuracy:.2f}, margin {margin:.3f}"
        )
    for name in runners:
        if name != "loraflow dpo (defaults)":
            print(f"ratio loraflow / {name}: {ours / statistics.median(rates[name]):.2f}x (pairs per second)")


if __name__ == "__main__":
    sys.exit(main())
