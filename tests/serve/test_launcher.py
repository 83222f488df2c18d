"""The vLLM command line `loraflow serve` builds, checked without starting vLLM: on this CPU, and as it would be
on a CUDA machine (torch's CUDA queries are stubbed; nothing else is)."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraflow.hub.base import BaseModel
from loraflow.serve import launcher


def settings(tmp_path, **overrides) -> launcher.ServerSettings:
    base = BaseModel(
        name="smollm2-135m", hub_id="HuggingFaceTB/SmolLM2-135M-Instruct", path=Path("/m"), fingerprint="f"
    )
    return launcher.ServerSettings(registry=str(tmp_path / "registry.json"), base=base, port=8000, **overrides)


def quantization_of(command: list[str]) -> str | None:
    return command[command.index("--quantization") + 1] if "--quantization" in command else None


def on_cuda(monkeypatch, capability: tuple[int, int]) -> None:
    import torch

    monkeypatch.setattr(launcher, "on_gpu", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


def test_the_cpu_serves_an_int8_base(tmp_path, monkeypatch):
    monkeypatch.setattr(launcher, "on_gpu", lambda: False)
    assert quantization_of(settings(tmp_path).command()) == "int8_per_channel_weight_only"


@pytest.mark.parametrize("capability", [(7, 5), (8, 0), (8, 9), (9, 0)])
def test_a_cuda_machine_serves_an_fp8_base_by_default(tmp_path, monkeypatch, capability):
    on_cuda(monkeypatch, capability)
    command = settings(tmp_path).command()
    assert quantization_of(command) == "fp8"
    assert "--enable-lora" in command and command[command.index("--max-lora-rank") + 1] == "16"


def test_a_gpu_too_old_for_fp8_serves_the_base_unquantized(tmp_path, monkeypatch):
    on_cuda(monkeypatch, (7, 0))
    assert quantization_of(settings(tmp_path).command()) is None


@pytest.mark.parametrize("chosen, expected", [("awq", "awq"), ("gptq", "gptq"), ("none", None)])
def test_quantization_overrides_the_default(tmp_path, monkeypatch, chosen, expected):
    on_cuda(monkeypatch, (9, 0))
    assert quantization_of(settings(tmp_path, quantization=chosen).command()) == expected
