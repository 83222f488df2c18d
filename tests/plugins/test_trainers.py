"""Each built-in trainer, a couple of steps on the tiny model: a loadable adapter, its metrics, its config surface."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loraflow.arena.judge import prompts_from
from loraflow.hub.errors import LoraflowError
from loraflow.hub.training import load_config, run_training
from tests.conftest import PIRATE, make_adapter, run_loraflow

TINY = dict(max_steps=2, per_device_train_batch_size=2, max_length=96, eval_split=0.05, lora_r=4, lora_alpha=8)
SETTINGS = {
    "lora": TINY,
    "qlora": TINY,
    "sft": {**TINY, "extract_rank": 4},
    "dpo": TINY,
    "kto": TINY,
    "ppo": {**TINY, "total_episodes": 4, "response_length": 4, "num_ppo_epochs": 1, "reward_max_steps": 2},
}
DATA = {"lora": "train.jsonl", "qlora": "train.jsonl", "sft": "train.jsonl", "dpo": "prefs.jsonl", "ppo": "prefs.jsonl"}


def write_unpaired(path: Path, pairs: int | None = None) -> Path:
    """The pirate preference pairs as unpaired answers: each chosen answer desirable, each rejected one not."""
    lines = []
    for line in (PIRATE / "prefs.jsonl").read_text().splitlines()[:pairs]:
        pair = json.loads(line)
        lines.append(json.dumps({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True}))
        lines.append(json.dumps({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False}))
    path.write_text("\n".join(lines) + "\n")
    return path


def training_data(trainer_name: str, folder: Path) -> Path:
    """The shipped pirate data the trainer reads; unpaired data is made from the preference pairs, into `folder`."""
    if trainer_name == "kto":
        return write_unpaired(folder / "unpaired.jsonl", pairs=40)
    return PIRATE / DATA[trainer_name]


def train(trainer_name, tiny_base, registry, name=None, parent=None, **overrides):
    from loraflow.hub.plugins import get_plugins

    config_class = get_plugins().trainer(trainer_name).trainer_class.config_class
    config = load_config(config_class, overrides={**SETTINGS[trainer_name], **overrides})
    return run_training(
        trainer_name,
        data=training_data(trainer_name, registry.path.parent),
        name=name or f"tiny-{trainer_name}",
        base_spec=str(tiny_base.path),
        registry=registry,
        config=config,
        parent=parent,
    )


def load_in_peft(tiny_base, folder):
    """Plain PEFT, as a user outside loraflow would load it; returns the logits on a fixed input."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base.path), folder)
    with torch.no_grad():
        return model(torch.tensor([[1, 2, 3, 4]])).logits


@pytest.mark.parametrize("trainer_name", ["lora", "qlora", "sft", "dpo", "kto", "ppo"])
def test_trainer_publishes_an_adapter_that_loads_in_peft(trainer_name, tiny_base, registry):
    version = train(trainer_name, tiny_base, registry)
    folder = registry.folder(version)
    assert version.kind == "adapter" and version.trainer["name"] == trainer_name
    assert (folder / "adapter_model.safetensors").is_file() and (folder / "README.md").is_file()
    assert not (folder / "ref").exists(), "only the trained adapter is published"
    assert version.metrics["train_steps"] >= 1
    assert load_in_peft(tiny_base, folder).isfinite().all()
    card = (folder / "README.md").read_text()
    assert trainer_name in card and "loss_curve.png" in card and (folder / "loss_curve.png").is_file()


def test_sft_records_extraction_error_and_both_eval_losses(tiny_base, registry):
    import safetensors.torch

    version = train("sft", tiny_base, registry, extract_rank=2)
    metrics = version.metrics
    assert 0 < metrics["extract_relative_error"] < 1
    assert metrics["full_eval_loss"] > 0 and metrics["eval_loss"] > 0
    tensors = safetensors.torch.load_file(registry.folder(version) / "adapter_model.safetensors")
    shapes = {tuple(t.shape) for key, t in tensors.items() if "lora_A" in key}
    assert {shape[0] for shape in shapes} == {2}, "extracted adapter has the chosen rank"
    assert any("gate_proj" in key for key in tensors), "the MLP projections are extracted too"
    assert (next(iter(registry.path.parent.glob("adapters/*/v1")))).is_dir()


@pytest.mark.parametrize("bf16", [True, False])
def test_a_frozen_base_loads_in_the_training_dtype_and_what_trains_stays_fp32(bf16, tiny_base, tmp_path):
    """LoRA's frozen base in bf16 when training runs in bf16 (no per-step weight casts); the adapter in fp32 for
    the optimizer. sft updates every weight, so its base stays fp32 on the CPU whatever bf16 says."""
    import torch
    from peft import get_peft_model

    from loraflow.hub.training import TrainJob
    from loraflow.plugins.common import lora_config
    from loraflow.plugins.lora import LoraTrainer, LoraTrainingConfig
    from loraflow.plugins.sft import SftTrainer, SftTrainingConfig

    lora_job = TrainJob(tiny_base, LoraTrainingConfig(bf16=bf16), "t", [], [], tmp_path)
    model = get_peft_model(LoraTrainer().load_model(lora_job), lora_config(lora_job.config))
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16 if bf16 else torch.float32}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    sft_job = TrainJob(tiny_base, SftTrainingConfig(bf16=bf16), "t", [], [], tmp_path)
    assert {p.dtype for p in SftTrainer().load_model(sft_job).parameters()} == {torch.float32}


def test_low_rank_factors_recover_a_low_rank_delta():
    import torch

    from loraflow.plugins.sft import low_rank_factors

    torch.manual_seed(0)
    delta = torch.randn(40, 3) @ torch.randn(3, 24)
    lora_a, lora_b, residual, total = low_rank_factors(delta, 3)
    assert torch.allclose(lora_b @ lora_a, delta, atol=1e-4)
    assert residual / total < 1e-8
    _, _, residual_2, _ = low_rank_factors(delta, 2)
    assert residual_2 / total > 1e-3


def test_dpo_with_parent_uses_the_parent_as_reference(tiny_base, registry, tmp_path):
    parent = registry.publish(make_adapter(tiny_base, tmp_path / "parent", rank=4), "tiny-parent", base=tiny_base)
    version = train("dpo", tiny_base, registry, name="tiny-dpo-child", parent=parent.ref)
    assert version.parent == parent.ref
    # Before any step the policy is the parent; margins are zero only if the reference is the parent too.
    assert abs(version.metrics["before_eval_reward_margin"]) < 1e-4
    assert "eval_reward_accuracy" in version.metrics


@pytest.mark.parametrize("trainer_name", ["dpo", "kto"])
@pytest.mark.parametrize("epochs, precomputed", [(1, False), (2, True)])
def test_the_reference_is_computed_once_when_training_reads_each_example_more_than_once(
    trainer_name, epochs, precomputed, tiny_base, tmp_path
):
    from transformers import TrainerCallback

    from loraflow.hub.data import load_records
    from loraflow.hub.plugins import get_plugins
    from loraflow.hub.training import TrainJob

    class RecordArguments(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen["precompute"] = args.precompute_ref_log_probs

    seen = {}
    trainer = get_plugins().trainer(trainer_name).trainer_class
    records = load_records(training_data(trainer_name, tmp_path), trainer.data_format)[:12]
    config = trainer.config_class(**{**TINY, "max_steps": -1, "num_train_epochs": epochs})
    parent = make_adapter(tiny_base, tmp_path / "parent", rank=4)
    job = TrainJob(tiny_base, config, "t", records[:8], records[8:], tmp_path / "run", parent_dir=parent,
                   callbacks=[RecordArguments()])  # fmt: skip
    metrics = trainer().train(job).metrics
    assert seen["precompute"] is precomputed
    assert metrics["train_steps"] == 4 * epochs
    # The reference is the parent either way: before any step the policy's margin over it is zero.
    assert abs(metrics["before_eval_reward_margin"]) < 1e-4
    assert metrics["eval_reward_margin"] != metrics["before_eval_reward_margin"], "the policy moved"


def test_passes_over_data_counts_epochs_or_what_max_steps_reads(tmp_path):
    from loraflow.hub.training import TrainingConfig, TrainJob
    from loraflow.plugins.common import passes_over_data

    def passes(records: int, **settings) -> float:
        return passes_over_data(TrainJob(None, TrainingConfig(**settings), "t", [{}] * records, [], tmp_path))

    assert passes(10, num_train_epochs=3.0) == 3.0
    assert passes(10, max_steps=5, per_device_train_batch_size=4) == 2.0  # 20 examples read out of 10
    assert passes(40, max_steps=5, per_device_train_batch_size=2, gradient_accumulation_steps=2) == 0.5


def test_ppo_publishes_a_reusable_reward_model(tiny_base, registry):
    first = train("ppo", tiny_base, registry, name="tiny-rl")
    reward = registry.get("tiny-rl-reward")
    assert reward.kind == "reward" and first.metrics["reward_model"] == reward.ref
    assert {"mean_reward_before", "mean_reward_after"} <= set(first.metrics)
    second = train("ppo", tiny_base, registry, name="tiny-rl-again", reward=reward.ref)
    assert second.metrics["reward_model"] == reward.ref
    assert registry.versions("tiny-rl-reward")[-1].version == 1, "reusing the reward trains no new one"


def test_ppo_refuses_an_adapter_as_reward(tiny_base, registry, tiny_adapter):
    plain = registry.publish(tiny_adapter, "plain", base=tiny_base)
    with pytest.raises(LoraflowError, match="not a reward model"):
        train("ppo", tiny_base, registry, reward=plain.ref)


def test_yaml_config_is_overridden_by_flags(tmp_path):
    from loraflow.plugins.dpo import DpoTrainingConfig

    path = tmp_path / "dpo.yaml"
    path.write_text("beta: 0.3\nlearning_rate: 1e-4\nlora_r: 4\n")
    config = load_config(DpoTrainingConfig, path, {"learning_rate": 5e-6, "beta": None})
    assert (config.beta, config.learning_rate, config.lora_r) == (0.3, 5e-6, 4)


@pytest.mark.parametrize(
    ("config_path", "fields", "message"),
    [
        ("loraflow.plugins.dpo:DpoTrainingConfig", {"beta": 0}, "beta must be positive"),
        ("loraflow.plugins.sft:SftTrainingConfig", {"extract_rank": 0}, "extract_rank"),
        ("loraflow.plugins.ppo:PpoTrainingConfig", {"kl_coef": -1, "response_length": 0}, "kl_coef.*response_length"),
        ("loraflow.plugins.qlora:QLoraTrainingConfig", {"lora_r": 0}, "lora_r"),
    ],
)
def test_invalid_config_values_are_refused(config_path, fields, message):
    import importlib

    module_name, class_name = config_path.split(":")
    config_class = getattr(importlib.import_module(module_name), class_name)
    with pytest.raises(LoraflowError, match=message):
        config_class(**fields)


def test_every_config_field_has_help():
    import dataclasses

    from loraflow.hub.plugins import get_plugins

    for name in ("sft", "lora", "qlora", "dpo", "kto", "ppo"):
        config_class = get_plugins().trainer(name).trainer_class.config_class
        missing = [f.name for f in dataclasses.fields(config_class) if not f.metadata.get("help")]
        assert not missing, f"{name}: no help on {missing}"


def test_messages_given_to_dpo_are_refused_before_loading(tiny_base, registry):
    with pytest.raises(LoraflowError, match="messages data, but this trainer takes preference data"):
        run_training("dpo", data=PIRATE / "train.jsonl", name="wrong", base_spec=str(tiny_base.path), registry=registry)


def test_malformed_preference_lines_are_each_reported(tiny_base, registry, tmp_path):
    data = tmp_path / "prefs.jsonl"
    data.write_text(
        json.dumps({"prompt": "Hi", "chosen": "Arr!", "rejected": "Hello"})
        + "\n"
        + json.dumps({"prompt": "Hi", "chosen": "same", "rejected": "same"})
        + "\n"
        + "{not json\n"
    )
    with pytest.raises(LoraflowError) as error:
        run_training("ppo", data=data, name="bad", base_spec=str(tiny_base.path), registry=registry)
    assert f"{data}:2:" in str(error.value) and f"{data}:3:" in str(error.value)


def test_cli_trains_qlora_with_yaml_and_flag(tiny_base, tmp_path):
    config = tmp_path / "qlora.yaml"
    config.write_text(
        "max_steps: 1\nper_device_train_batch_size: 2\nmax_length: 96\neval_split: 0\nlora_r: 2\nlora_alpha: 4\n"
    )
    registry_file = tmp_path / "registry.json"
    result = run_loraflow(
        "--registry",
        str(registry_file),
        "train",
        "qlora",
        "--data",
        str(PIRATE / "train.jsonl"),
        "--name",
        "cli-qlora",
        "--base",
        str(tiny_base.path),
        "--config",
        str(config),
        "--lora-r",
        "4",
    )
    assert "published cli-qlora@1" in result.stdout
    record = json.loads(registry_file.read_text())["adapters"]["cli-qlora"]["versions"]["1"]
    adapter_config = json.loads((registry_file.parent / record["path"] / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4, "the flag overrides the YAML file"


def test_train_help_lists_method_knobs():
    flags = [
        ("dpo", "--beta"),
        ("kto", "--desirable-weight"),
        ("ppo", "--kl-coef"),
        ("ppo", "--response-length"),
        ("sft", "--extract-rank"),
    ]
    for trainer_name, flag in flags:
        assert flag in run_loraflow("train", trainer_name, "--help").stdout


def test_report_to_tensorboard_logs_the_loss_and_records_where(tiny_base, registry):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    version = train("lora", tiny_base, registry, name="tiny-tracked", report_to="tensorboard")
    tracking = version.provenance["tracking"]
    assert tracking["report_to"] == "tensorboard"
    log_dir = tracking["location"]
    assert "/checkpoints/runs/" in log_dir, "TRL's default log folder, inside the run's folder"
    events = EventAccumulator(log_dir)
    events.Reload()
    losses = [event.value for event in events.Scalars("train/loss")]
    assert len(losses) == 2 and all(loss > 0 for loss in losses), "logging_steps=1 over max_steps=2"
    assert f"- tracking: {log_dir}" in (registry.folder(version) / "README.md").read_text()


def test_every_trainer_output_loads_in_vllm_and_changes_its_answers(tiny_base, registry):
    """vLLM, the server's engine, loads what each trainer publishes and applies it: each adapter moves the
    logprobs of the greedy answers away from the base's (a larger learning rate makes sure two steps move them)."""
    folders = {name: registry.folder(train(name, tiny_base, registry, learning_rate=1e-2)) for name in SETTINGS}
    prompts = prompts_from(PIRATE / "heldout.jsonl")[:4]
    result = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("vllm_generate.py")), str(tiny_base.path), json.dumps(prompts)]
        + [f"{name}={folder}" for name, folder in folders.items()],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    logprobs = json.loads(result.stdout.split("LOGPROBS ", 1)[1].splitlines()[0])
    assert set(logprobs) == {"base", *SETTINGS}
    assert all(len(values) == len(prompts) for values in logprobs.values())
    assert all(logprobs[name] != logprobs["base"] for name in SETTINGS), logprobs
