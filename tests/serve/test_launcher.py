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


def dtype_of(command: list[str]) -> str | None:
    return command[command.index("--dtype") + 1] if "--dtype" in command else None


def on_cuda(monkeypatch, capability: tuple[int, int]) -> None:
    import torch

    monkeypatch.setattr(launcher, "on_gpu", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


def on_cpu(monkeypatch, native_bf16: bool) -> None:
    monkeypatch.setattr(launcher, "on_gpu", lambda: False)
    monkeypatch.setattr(launcher, "cpu_fast_bf16", lambda: native_bf16)


def test_a_cpu_with_native_bf16_serves_an_int8_base_in_bf16(tmp_path, monkeypatch):
    on_cpu(monkeypatch, native_bf16=True)
    command = settings(tmp_path).command()
    assert (quantization_of(command), dtype_of(command)) == ("int8_per_channel_weight_only", "bfloat16")


def test_a_cpu_that_emulates_bf16_serves_fp32_unless_int8_is_asked_for(tmp_path, monkeypatch):
    on_cpu(monkeypatch, native_bf16=False)
    command = settings(tmp_path).command()
    assert (quantization_of(command), dtype_of(command)) == (None, "float32")
    forced = settings(tmp_path, quantization="int8_per_channel_weight_only").command()
    assert (quantization_of(forced), dtype_of(forced)) == ("int8_per_channel_weight_only", "bfloat16")


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


def test_a_cuda_machine_keeps_the_checkpoint_dtype_and_dtype_overrides(tmp_path, monkeypatch):
    on_cuda(monkeypatch, (9, 0))
    assert dtype_of(settings(tmp_path).command()) is None
    assert dtype_of(settings(tmp_path, dtype="float16").command()) == "float16"


def test_the_server_measures_per_version_metrics_labelled_with_its_replica(tmp_path):
    command = settings(tmp_path).command()
    assert command[command.index("--middleware") + 1] == "loraflow.serve.metrics.MetricsMiddleware"
    assert settings(tmp_path).environment()["LORAFLOW_REPLICA"] == "127.0.0.1:8000"
    assert settings(tmp_path, replica="replica-7").environment()["LORAFLOW_REPLICA"] == "replica-7"
