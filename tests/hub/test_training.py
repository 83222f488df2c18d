"""The config surface every trainer shares: YAML first, flags override, values follow the field types."""

from __future__ import annotations

import pytest

from loraflow.hub.errors import LoraflowError
from loraflow.hub.training import Artifact, TrainingConfig, TrainResult, load_config, run_training


def test_yaml_scientific_notation_and_string_flags_become_numbers(tmp_path):
    path = tmp_path / "lora.yaml"
    path.write_text("learning_rate: 2e-4\nlora_r: 4\ngradient_checkpointing: true\n")
    config = load_config(TrainingConfig, path, {"max_steps": "20", "lora_r": 16})
    assert config.learning_rate == pytest.approx(2e-4)
    assert (config.max_steps, config.lora_r, config.gradient_checkpointing) == (20, 16, True)


def test_unknown_field_names_the_line(tmp_path):
    path = tmp_path / "lora.yaml"
    path.write_text("lora_r: 4\nlearnig_rate: 1e-4\n")
    with pytest.raises(LoraflowError, match=r"lora.yaml:2: unknown field 'learnig_rate'"):
        load_config(TrainingConfig, path)


def test_a_config_that_is_not_utf8_names_the_line_and_byte(tmp_path):
    path = tmp_path / "lora.yaml"
    path.write_bytes(b"lora_r: 4\n# caf\xe9\n")
    with pytest.raises(LoraflowError, match=r"lora.yaml:2: byte 15 is not UTF-8"):
        load_config(TrainingConfig, path)


def test_a_value_of_the_wrong_type_is_a_clear_error():
    with pytest.raises(LoraflowError, match="TrainingConfig.max_steps must be a int, not 'many'"):
        load_config(TrainingConfig, None, {"max_steps": "many"})


class TwoAdapters:
    """A stand-in trainer that returns an adapter and one extra artifact without training anything."""

    name, description = "two", "An adapter and an extra artifact."
    config_class, data_format = TrainingConfig, "messages"
    base = None  # the test sets the tiny base model

    def train(self, job):
        from tests.conftest import make_adapter

        extra = Artifact(
            make_adapter(self.base, job.output_dir / "extra", seed=1),
            name_suffix="-extra",
            kind="reward",
            metrics={"accuracy": 1.0},
            recorded_as="extra_model",
        )
        return TrainResult(make_adapter(self.base, job.output_dir / "adapter"), {"loss": 0.5}, extra_artifacts=[extra])


def test_run_training_publishes_extra_artifacts_promote_and_actor(tiny_base, registry, monkeypatch, tmp_path):
    from types import SimpleNamespace

    from loraflow.hub import training
    from loraflow.hub.plugins import PluginSource, TrainerInfo
    from tests.conftest import PIRATE

    monkeypatch.setenv("LORAFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(TwoAdapters, "base", tiny_base)
    info = TrainerInfo("two", TwoAdapters, TwoAdapters.description, PluginSource("two", "test-plugin", "0"))
    monkeypatch.setattr(training, "get_plugins", lambda: SimpleNamespace(trainer=lambda name: info))

    def train(**flags):
        return run_training(
            "two", data=PIRATE / "train.jsonl", name="pair", base_spec=str(tiny_base.path), registry=registry, **flags
        )

    first, second = train(), train(promote=True, actor="gate")
    assert (first.metrics["extra_model"], second.metrics["extra_model"]) == ("pair-extra@1", "pair-extra@2")
    extra = registry.get("pair-extra@2")
    assert extra.kind == "reward" and extra.metrics == {"accuracy": 1.0} and extra.trainer["stage"] == "reward"
    assert registry.live("pair").ref == "pair@2", "promote=True makes the adapter live"
    assert registry.live("pair-extra").ref == "pair-extra@1", "an extra artifact's later versions are candidates"
    assert registry.history("pair")[-1].actor == "gate"


def test_report_to_takes_trls_integrations_and_needs_their_package(monkeypatch):
    import transformers.integrations

    with pytest.raises(LoraflowError, match="report_to must be one of none, tensorboard, trackio, wandb, mlflow"):
        TrainingConfig(report_to="comet_ml")
    monkeypatch.setattr(transformers.integrations, "get_available_reporting_integrations", lambda: ["tensorboard"])
    with pytest.raises(LoraflowError, match="report_to wandb needs the wandb package: pip install wandb"):
        load_config(TrainingConfig, None, {"report_to": "wandb"})
    assert TrainingConfig(report_to="tensorboard").report_to == "tensorboard"


def test_the_data_source_and_its_mapping_go_into_the_card_and_provenance(tiny_base, registry, monkeypatch, tmp_path):
    import json
    from types import SimpleNamespace

    from loraflow.hub import training
    from loraflow.hub.plugins import PluginSource, TrainerInfo

    monkeypatch.setenv("LORAFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(TwoAdapters, "base", tiny_base)
    info = TrainerInfo("two", TwoAdapters, TwoAdapters.description, PluginSource("two", "test-plugin", "0"))
    monkeypatch.setattr(training, "get_plugins", lambda: SimpleNamespace(trainer=lambda name: info))
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps([{"instruction": f"Say {n}", "input": "", "output": f"Arr {n}!"} for n in range(10)]))
    version = run_training("two", data=data, name="mapped", base_spec=str(tiny_base.path), registry=registry)
    summary = version.provenance["data"]
    assert summary["source"] == "alpaca.json" and summary["format"] == "messages"
    assert summary["mapping"].startswith("alpaca (Alpaca instruction/input/output")
    assert (summary["train_examples"], summary["eval_examples"]) == (9, 1)
    assert "tracking" not in version.provenance, "report_to none records no tracking"
    card = (registry.folder(version) / "README.md").read_text()
    assert "- mapping: alpaca (Alpaca instruction/input/output" in card and "- source: alpaca.json" in card
