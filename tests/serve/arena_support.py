"""What the arena's end-to-end and browser tests share: a v1 pirate adapter and a running `loraflow serve`."""

from __future__ import annotations

from tests.conftest import PIRATE


def publish_pirate_v1(registry, base_spec: str = "smollm2-135m", max_steps: int = 16, learning_rate: float = 1e-3):
    """A lora adapter trained for a few steps on data/pirate: it opens about a quarter of its answers with "Arr"."""
    from hub.training import run_training
    from plugins.lora import LoraTrainingConfig

    config = LoraTrainingConfig(max_steps=max_steps, eval_split=0.0, learning_rate=learning_rate, lora_r=8, lora_alpha=16)
    return run_training("lora", data=PIRATE / "train.jsonl", name="pirate", base_spec=base_spec, registry=registry, config=config)


def greedy_answer(client, model: str, prompt: str, max_tokens: int = 24) -> str:
    response = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0)
    return response.choices[0].message.content or ""
