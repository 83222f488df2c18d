"""ppo with a parent, on the tiny model: the policy continues the parent's adapter against a frozen copy of the
parent, and a later turn trains the name's reward model further instead of a new one."""

from __future__ import annotations

import pytest

from tests.conftest import make_adapter
from tests.plugins.test_trainers import load_in_peft, train


def adapter_tensors(folder) -> dict:
    import safetensors.torch

    return safetensors.torch.load_file(folder / "adapter_model.safetensors")


def trainable_tensors(model) -> dict:
    """The model's trainable weights under the names PEFT saves them with (no adapter name, no wrapper)."""
    return {
        name.replace(".modules_to_save", "").replace(".default", ""): parameter.detach().clone()
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    }


def base_logits(tiny_base):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(tiny_base.path)(torch.tensor([[1, 2, 3, 4]])).logits


@pytest.fixture
def ppo_start(monkeypatch):
    """What PPOTrainer trains and measures against when its training starts, and the first KL it logs."""
    from trl.experimental.ppo import PPOTrainer

    seen = {}
    original = PPOTrainer.train

    def train_and_record(self):
        seen["policy"] = trainable_tensors(self.model.policy)
        seen["reference"] = self.ref_model
        result = original(self)
        seen["first_kl"] = next(entry["objective/kl"] for entry in self.state.log_history if "objective/kl" in entry)
        return result

    monkeypatch.setattr(PPOTrainer, "train", train_and_record)
    return seen


@pytest.fixture
def reward_starts(monkeypatch):
    """The trainable weights of each reward model RewardTrainer starts training."""
    from trl import RewardTrainer

    starts = []
    original = RewardTrainer.train

    def train_and_record(self, *args, **kwargs):
        starts.append(trainable_tensors(self.model))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(RewardTrainer, "train", train_and_record)
    return starts


@pytest.fixture
def parent(tiny_base, registry, tmp_path):
    return registry.publish(make_adapter(tiny_base, tmp_path / "parent", rank=4), "tiny-policy", base=tiny_base)


def test_ppo_continues_the_parent_against_a_frozen_copy_of_it(tiny_base, registry, parent, ppo_start):
    import torch

    version = train("ppo", tiny_base, registry, name="tiny-policy", parent=parent.ref)
    parent_weights = adapter_tensors(registry.folder(parent))
    assert version.parent == parent.ref and version.trainer["name"] == "ppo"

    started = ppo_start["policy"]
    assert started.keys() == parent_weights.keys(), "PPO trains the parent's adapter, not a new one"
    assert all(torch.equal(started[key], parent_weights[key]) for key in parent_weights)
    reference = ppo_start["reference"]
    assert reference is not None and not any(p.requires_grad for p in reference.parameters())
    with torch.no_grad():
        reference_logits = reference(torch.tensor([[1, 2, 3, 4]])).logits
    parent_logits = load_in_peft(tiny_base, registry.folder(parent))
    assert not torch.allclose(parent_logits, base_logits(tiny_base)), "the parent changes the base's output"
    assert torch.allclose(reference_logits, parent_logits, atol=1e-5), "the KL reference is the parent"
    assert abs(ppo_start["first_kl"]) < 1e-3, "the first rollouts come from a policy equal to its reference"

    published = adapter_tensors(registry.folder(version))
    assert published.keys() == parent_weights.keys()
    assert any(not torch.equal(published[key], parent_weights[key]) for key in parent_weights)

    reward = registry.get("tiny-policy-reward")
    assert reward.kind == "reward" and version.metrics["reward_model"] == reward.ref
    assert "reward_continued_from" not in version.metrics, "the name had no reward model to continue"


def test_a_second_turn_trains_the_reward_model_further(tiny_base, registry, parent, reward_starts):
    import torch

    second = train("ppo", tiny_base, registry, name="tiny-policy", parent=parent.ref)
    third = train("ppo", tiny_base, registry, name="tiny-policy", parent=second.ref)
    first_reward, second_reward = registry.versions("tiny-policy-reward")
    assert third.parent == second.ref and third.metrics["reward_model"] == second_reward.ref
    assert third.metrics["reward_continued_from"] == first_reward.ref
    assert second_reward.metrics["continued_from"] == first_reward.ref

    saved = adapter_tensors(registry.folder(first_reward))
    started = reward_starts[1]
    assert started.keys() == saved.keys(), "the LoRA and the score head of the first reward model train on"
    assert all(torch.equal(started[key], saved[key]) for key in saved)
    trained_further = adapter_tensors(registry.folder(second_reward))
    assert any(not torch.equal(saved[key], trained_further[key]) for key in saved)

    reused = train("ppo", tiny_base, registry, name="tiny-policy", parent=third.ref, reward=first_reward.ref)
    assert reused.metrics["reward_model"] == first_reward.ref
    assert len(registry.versions("tiny-policy-reward")) == 2, "a given reward model is reused, not trained"
