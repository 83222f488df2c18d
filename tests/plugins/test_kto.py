"""The kto trainer on the tiny model: unpaired data in, a PEFT adapter out; a parent continued against itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraflow.hub.errors import LoraflowError
from loraflow.hub.training import load_config, run_training
from loraflow.plugins.kto import KtoTrainingConfig, check_both_labels
from tests.conftest import PIRATE, make_adapter
from tests.plugins.test_trainers import load_in_peft, write_unpaired

TINY = dict(max_steps=2, per_device_train_batch_size=2, max_length=96, eval_split=0.1, lora_r=4, lora_alpha=8)


def train_kto(tiny_base, registry, data: Path, name: str = "tiny-kto", parent: str | None = None, **overrides):
    config = load_config(KtoTrainingConfig, overrides={**TINY, **overrides})
    return run_training(
        "kto", data=data, name=name, base_spec=str(tiny_base.path), registry=registry, config=config, parent=parent
    )


def lora_tensors(folder: Path) -> dict:
    import safetensors.torch

    return safetensors.torch.load_file(folder / "adapter_model.safetensors")


def test_kto_trains_on_unpaired_data_and_publishes_an_adapter_that_loads(tiny_base, registry, tmp_path):
    version = train_kto(tiny_base, registry, write_unpaired(tmp_path / "unpaired.jsonl", pairs=10))
    folder = registry.folder(version)
    assert version.trainer["name"] == "kto" and version.kind == "adapter"
    assert version.provenance["data"]["format"] == "unpaired"
    assert version.metrics["train_steps"] == 2 and version.metrics["train_examples"] == 18
    assert {"eval_loss", "eval_kl", "before_eval_kl"} <= set(version.metrics)
    assert not any(".ref." in key for key in lora_tensors(folder)), "only the trained adapter is published"
    assert load_in_peft(tiny_base, folder).isfinite().all()


def test_kto_with_a_parent_continues_it_against_itself(tiny_base, registry, tmp_path):
    parent = registry.publish(make_adapter(tiny_base, tmp_path / "parent", rank=4), "tiny-parent", base=tiny_base)
    data = write_unpaired(tmp_path / "unpaired.jsonl", pairs=10)
    child = train_kto(tiny_base, registry, data, name="tiny-kto-child", parent=parent.ref, learning_rate=1e-3)
    assert child.parent == parent.ref
    assert [version.ref for version in registry.lineage(child.ref)] == [parent.ref, child.ref]
    # Before any step the policy is the parent; its rewards are zero only if the reference is the parent too.
    rewards = {name: value for name, value in child.metrics.items() if name.startswith("before_eval_reward_")}
    assert rewards and all(abs(value) < 1e-4 for value in rewards.values()), rewards
    before, after = lora_tensors(registry.folder(parent)), lora_tensors(registry.folder(child))
    assert before.keys() == after.keys(), "the child is the parent's adapter, continued"
    assert any(not before[key].equal(after[key]) for key in before), "training moved the parent's weights"


def test_kto_trains_on_arena_votes_of_every_outcome(tiny_base, registry, tmp_path):
    from loraflow.arena.export import export_training_data
    from loraflow.arena.votes import Vote

    pairs = [json.loads(line) for line in (PIRATE / "prefs.jsonl").read_text().splitlines()[:8]]
    outcomes = ["a", "b", "tie", "both_bad"] * 2
    votes = [
        Vote(f"v{seq}", "s1", pair["prompt"], pair["chosen"], pair["rejected"], "pirate@1", "base", outcome, seq=seq)
        for seq, (pair, outcome) in enumerate(zip(pairs, outcomes), 1)
    ]
    report = export_training_data(votes, tmp_path / "votes.jsonl", "unpaired")
    assert (report.desirable, report.undesirable) == (8, 8)
    version = train_kto(tiny_base, registry, report.out, name="tiny-kto-votes", eval_split=0, max_steps=1)
    assert version.metrics["train_examples"] == 16 and version.metrics["train_steps"] == 1


def test_malformed_unpaired_lines_are_each_named_before_any_model_loads(tiny_base, registry, tmp_path):
    data = tmp_path / "unpaired.jsonl"
    data.write_text(
        json.dumps({"prompt": "Hi", "completion": "Arr!", "label": True})
        + "\n"
        + json.dumps({"prompt": "Hi", "completion": "Hello", "label": "no"})
        + "\n"
        + json.dumps({"prompt": "Hi", "label": False})
        + "\n"
        + "{not json\n"
    )
    with pytest.raises(LoraflowError) as error:
        train_kto(tiny_base, registry, data)
    message = str(error.value)
    assert f'{data}:2: "label" must be true (a desirable answer) or false (an undesirable one), not a string' in message
    assert f'{data}:3: "completion" must be a non-empty string, not null' in message
    assert f"{data}:4:2: not valid JSON" in message
    assert f"{data}:1:" not in message


def test_data_of_one_label_is_refused_naming_the_file_and_what_is_missing(tiny_base, registry, tmp_path):
    data = tmp_path / "thumbs-down.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"Q{i}", "completion": "Hello", "label": False}) + "\n" for i in range(4))
    )
    with pytest.raises(LoraflowError, match=rf"{data}: all 4 examples are undesirable .*needs desirable answers"):
        train_kto(tiny_base, registry, data)


def test_a_training_split_left_with_one_label_is_refused():
    with pytest.raises(LoraflowError, match=r"3 training examples hold no undesirable \(label false\).*--eval-split"):
        check_both_labels([{"label": True}] * 3)
    check_both_labels([{"label": True}, {"label": False}])


def test_preference_pairs_given_to_kto_are_refused_with_the_unpaired_example(tiny_base, registry):
    with pytest.raises(LoraflowError, match=r"preference data, but this trainer takes unpaired data.*\"label\": true"):
        train_kto(tiny_base, registry, PIRATE / "prefs.jsonl")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"per_device_train_batch_size": 1}, "per_device_train_batch_size must be at least 2 for KTO"),
        ({"beta": 0, "undesirable_weight": -1}, "beta must be positive; undesirable_weight must be positive"),
    ],
)
def test_invalid_kto_config_values_are_refused(fields, message):
    with pytest.raises(LoraflowError, match=message):
        KtoTrainingConfig(**fields)
