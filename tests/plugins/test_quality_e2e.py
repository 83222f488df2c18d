"""Each trainer on the real SmolLM2-135M and the pirate task, measured on the held-out prompts.

The task metric is the fraction of greedy answers that open with "Arr" (the base model: none). sft, lora
and qlora must raise it; dpo on the preference pairs must raise it; ppo must raise the mean reward its
reward model gives on held-out prompts. Every adapter must load in vLLM. The numbers are printed (-s):
    .venv/bin/python -m pytest tests/plugins/test_quality_e2e.py -s
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loraflow.arena.judge import is_pirate, prompts_from
from loraflow.hub.base import DEFAULT_BASE
from loraflow.hub.training import load_config, run_training
from tests.conftest import PIRATE

pytestmark = pytest.mark.e2e

COMMON = dict(
    per_device_train_batch_size=8, max_length=128, eval_split=0.05, lr_scheduler_type="constant", warmup_ratio=0.0
)
RUNS = {
    "lora": ("train.jsonl", dict(COMMON, max_steps=12, learning_rate=1e-3)),
    "qlora": ("train.jsonl", dict(COMMON, max_steps=12, learning_rate=1e-3)),
    "sft": ("train.jsonl", dict(COMMON, max_steps=12, learning_rate=5e-5)),
    # The paper's sigmoid loss mostly pushes the rejected answers down here (pirate-ish "Aye, matey" answers, few
    # opening "Arr": 0.0 to 0.33 in our runs); apo_zero also pulls the chosen answers up.
    "dpo": ("prefs.jsonl", dict(COMMON, max_steps=16, learning_rate=1e-3, beta=0.1, loss_type="apo_zero")),
    "ppo": (
        "prefs.jsonl",
        dict(
            COMMON,
            reward_max_steps=12,
            reward_learning_rate=1e-3,
            total_episodes=48,
            num_ppo_epochs=4,
            response_length=8,
            learning_rate=1e-3,
            kl_coef=0.02,
        ),
    ),
}


def heldout_prompts() -> list[str]:
    return prompts_from(PIRATE / "heldout.jsonl")


def arr_rate(answers: list[str]) -> float:
    return sum(map(is_pirate, answers)) / len(answers)


def peft_answers(base, adapter_folder: Path | None) -> list[str]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraflow.plugins.common import generate_answers

    model = AutoModelForCausalLM.from_pretrained(base.path)
    if adapter_folder is not None:
        model = PeftModel.from_pretrained(model, str(adapter_folder))
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    return generate_answers(model, tokenizer, heldout_prompts(), max_new_tokens=6)


@pytest.fixture(scope="module")
def e2e_registry(tmp_path_factory):
    from loraflow.hub.registry import Registry

    return Registry(tmp_path_factory.mktemp("e2e-registry") / "registry.json")


@pytest.fixture(scope="module")
def base_rate(smollm2):
    rate = arr_rate(peft_answers(smollm2, None))
    print(f"\n[quality] base: {rate:.2f} of held-out answers open with 'Arr'")
    return rate


@pytest.fixture(scope="module")
def trained(smollm2, e2e_registry):
    """Train each method once per module, on first use."""
    from loraflow.hub.plugins import get_plugins

    versions = {}

    def get(method: str):
        if method not in versions:
            data, settings = RUNS[method]
            config = load_config(get_plugins().trainer(method).trainer_class.config_class, overrides=settings)
            versions[method] = run_training(
                method,
                data=PIRATE / data,
                name=f"pirate-{method}",
                base_spec=DEFAULT_BASE,
                registry=e2e_registry,
                config=config,
            )
        return versions[method]

    return get


@pytest.mark.parametrize("method", ["lora", "qlora", "sft", "dpo"])
def test_training_raises_the_arr_rate(method, smollm2, base_rate, trained, e2e_registry):
    version = trained(method)
    rate = arr_rate(peft_answers(smollm2, e2e_registry.folder(version)))
    print(f"\n[quality] {method}: base {base_rate:.2f} -> {rate:.2f} 'Arr' rate; metrics {json.dumps(version.metrics)}")
    assert rate > base_rate
    assert rate >= 0.5


def test_sft_extraction_keeps_most_of_the_full_model(trained):
    metrics = trained("sft").metrics
    print(
        f"\n[quality] sft extraction: relative error {metrics['extract_relative_error']:.3f}, "
        f"eval loss full {metrics['full_eval_loss']:.3f} vs adapter {metrics['eval_loss']:.3f}"
    )
    assert 0 < metrics["extract_relative_error"] < 1


def test_ppo_raises_the_mean_reward(trained, e2e_registry):
    version = trained("ppo")
    metrics = version.metrics
    print(
        f"\n[quality] ppo: mean reward {metrics['mean_reward_before']:.3f} -> {metrics['mean_reward_after']:.3f}; "
        f"reward model accuracy {metrics.get('reward_eval_accuracy')}"
    )
    assert e2e_registry.get(metrics["reward_model"]).kind == "reward"
    assert metrics["mean_reward_after"] > metrics["mean_reward_before"]


def test_every_method_loads_in_vllm(smollm2, trained, e2e_registry):
    folders = {method: str(e2e_registry.folder(trained(method))) for method in RUNS}
    prompts = heldout_prompts()[:8]
    script = Path(__file__).with_name("vllm_generate.py")
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            str(smollm2.path),
            json.dumps(prompts),
            *(f"{method}={folder}" for method, folder in folders.items()),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    answers = json.loads(result.stdout.split("ANSWERS ", 1)[1].splitlines()[0])
    rates = {name: arr_rate(texts) for name, texts in answers.items()}
    print(f"\n[quality] vLLM 'Arr' rate on {len(prompts)} prompts: {rates}")
    assert set(answers) == {"base", *RUNS}
    assert all(all(isinstance(text, str) for text in texts) for texts in answers.values())
    # The adapters change vLLM's answers, so vLLM applied them rather than ignoring them.
    assert all(answers[method] != answers["base"] for method in RUNS)
    assert all(rates[method] > rates["base"] for method in ("lora", "qlora", "sft"))
