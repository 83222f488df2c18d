"""The qlora trainer's memory levers: quantize straight from the checkpoint's dtype, and the same model as before."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from loraflow.hub.training import TrainJob, load_config
from loraflow.plugins.qlora import QLoraTrainer, QLoraTrainingConfig
from tests.conftest import REPO


def qlora_job(base, tmp_path) -> TrainJob:
    config = load_config(QLoraTrainingConfig, overrides={"max_steps": 1})
    return TrainJob(base=base, config=config, name="q", train_records=[], eval_records=[], output_dir=tmp_path / "run")


@pytest.fixture(scope="module")
def tiny_bf16_base(tiny_base, tmp_path_factory):
    """The tiny model saved in bf16, as real checkpoints (SmolLM2 included) are."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraflow.hub.base import resolve_base

    folder = tmp_path_factory.mktemp("tiny-bf16")
    AutoModelForCausalLM.from_pretrained(tiny_base.path, dtype=torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_base.path).save_pretrained(folder)
    return resolve_base(str(folder))


def test_qlora_loads_a_bf16_checkpoint_into_the_model_an_fp32_load_made(tiny_bf16_base, tmp_path):
    """Quantizing from the checkpoint's bf16 instead of an fp32 copy changes no weight and no logit."""
    import torch
    from bitsandbytes.nn import Linear4bit
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = QLoraTrainer().load_model(qlora_job(tiny_bf16_base, tmp_path))
    quantized = [module for module in model.modules() if isinstance(module, Linear4bit)]
    compute_dtype = quantized[0].compute_dtype
    assert len(quantized) == 2 * 7, "every projection of both layers is 4-bit"
    assert all(module.weight.quant_state.dtype == compute_dtype for module in quantized)
    assert {p.dtype for p in model.parameters() if p.dtype != torch.uint8} == {torch.float32}
    assert not any(p.requires_grad for p in model.parameters())

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    reference = AutoModelForCausalLM.from_pretrained(
        tiny_bf16_base.path, quantization_config=quantization, device_map="cpu", dtype=torch.float32
    )
    reference = prepare_model_for_kbit_training(reference)
    tokens = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, reference(tokens).logits)


MEASURE_LOAD = """
import gc, json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import torch, transformers, peft, trl, bitsandbytes
from loraflow.hub.base import resolve_base
from loraflow.hub.training import TrainJob, load_config
from loraflow.plugins.qlora import QLoraTrainer, QLoraTrainingConfig

def rss_mib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024

config = load_config(QLoraTrainingConfig, overrides={"max_steps": 1})
job = TrainJob(resolve_base(sys.argv[2]), config, "q", [], [], Path(sys.argv[3]))
gc.collect()
before = rss_mib()
model = QLoraTrainer().load_model(job)
gc.collect()
print(json.dumps({"load_mib": rss_mib() - before}))
"""


@pytest.mark.e2e
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_qlora_load_of_smollm2_costs_little_more_than_its_4bit_weights(smollm2, tmp_path):
    """4-bit decoder weights (51 MiB) plus the fp32 tied embedding (108 MiB) is 159 MiB; lora's fp32 load is 513 MiB.
    Loading through an fp32 copy first left 200 to 430 MiB resident."""
    output = subprocess.run(
        [sys.executable, "-c", MEASURE_LOAD, str(REPO), smollm2.name, str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    load_mib = json.loads(output.strip().splitlines()[-1])["load_mib"]
    assert load_mib < 250, f"loading SmolLM2-135M for qlora took {load_mib:.0f} MiB of RSS"
