"""What the arena's end-to-end and browser tests share: a v1 pirate adapter and a running `loraflow serve`."""

from __future__ import annotations

from loraflow.hub.base import DEFAULT_BASE
from tests.conftest import PIRATE


def publish_pirate_v1(registry, base_spec: str = DEFAULT_BASE, max_steps: int = 16, learning_rate: float = 1e-3):
    """A lora adapter trained for a few steps on data/pirate: it opens about a quarter of its answers with "Arr"."""
    from loraflow.hub.training import run_training
    from loraflow.plugins.lora import LoraTrainingConfig

    config = LoraTrainingConfig(
        max_steps=max_steps, eval_split=0.0, learning_rate=learning_rate, lora_r=8, lora_alpha=16
    )
    data = PIRATE / "train.jsonl"
    return run_training("lora", data=data, name="pirate", base_spec=base_spec, registry=registry, config=config)


def greedy_answer(client, model: str, prompt: str, max_tokens: int = 24) -> str:
    messages = [{"role": "user", "content": prompt}]
    response = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
    return response.choices[0].message.content or ""
