"""LoRA on the real SmolLM2-135M and the pirate task, measured on the 40 held-out prompts.

The metric is the fraction of greedy answers that open with "Arr" (the base model: none); training must raise it
to at least half. The same measurement for every built-in trainer, and through vLLM, is a benchmark:
`python bench/train_quality.py` (the README's quality table). Each trainer's output loading in vLLM is checked on
the tiny model in test_trainers.py.
"""

from __future__ import annotations

import json

import pytest

from loraflow.arena.judge import is_pirate, prompts_from
from loraflow.hub.base import DEFAULT_BASE
from loraflow.hub.training import load_config, run_training
from loraflow.plugins.lora import LoraTrainingConfig
from tests.conftest import PIRATE

pytestmark = pytest.mark.e2e

LORA = dict(
    max_steps=12,
    learning_rate=1e-3,
    per_device_train_batch_size=8,
    max_length=128,
    eval_split=0.05,
    lr_scheduler_type="constant",
    warmup_ratio=0.0,
)


def arr_rate(base, adapter_folder) -> float:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraflow.plugins.common import generate_answers

    model = AutoModelForCausalLM.from_pretrained(base.path)
    if adapter_folder is not None:
        model = PeftModel.from_pretrained(model, str(adapter_folder))
    answers = generate_answers(
        model, AutoTokenizer.from_pretrained(base.path), prompts_from(PIRATE / "heldout.jsonl"), max_new_tokens=6
    )
    return sum(map(is_pirate, answers)) / len(answers)


def test_lora_raises_the_arr_rate(smollm2, registry):
    base_rate = arr_rate(smollm2, None)
    version = run_training(
        "lora",
        data=PIRATE / "train.jsonl",
        name="pirate-lora",
        base_spec=DEFAULT_BASE,
        registry=registry,
        config=load_config(LoraTrainingConfig, overrides=LORA),
    )
    rate = arr_rate(smollm2, registry.folder(version))
    print(f"\n[quality] lora: base {base_rate:.2f} -> {rate:.2f} 'Arr' rate; metrics {json.dumps(version.metrics)}")
    assert rate > base_rate
    assert rate >= 0.5
