"""The config surface every trainer shares: YAML first, flags override, values follow the field types."""

from __future__ import annotations

import pytest

from hub.errors import LoraflowError
from hub.training import TrainingConfig, load_config


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


def test_a_value_of_the_wrong_type_is_a_clear_error():
    with pytest.raises(LoraflowError, match="TrainingConfig.max_steps must be a int, not 'many'"):
        load_config(TrainingConfig, None, {"max_steps": "many"})
