"""The `qlora` trainer: a LoRA adapter trained on a 4-bit NF4 copy of the base (bitsandbytes), on CPU or GPU."""

from __future__ import annotations

from dataclasses import dataclass, field

from loraflow.hub.devices import fast_bf16, on_gpu
from loraflow.hub.hookspecs import hookimpl
from loraflow.hub.training import TrainJob
from loraflow.plugins.common import load_causal_lm
from loraflow.plugins.lora import LoraTrainer, LoraTrainingConfig


@dataclass
class QLoraTrainingConfig(LoraTrainingConfig):
    """LoRA's hyperparameters plus how the frozen base is quantized."""

    double_quant: bool = field(
        default=True,
        metadata={"help": "Quantize the quantization constants too (saves about 0.4 bits per weight)."},
    )
    gradient_checkpointing: bool = field(
        default=True,
        metadata={
            "help": (
                "Recompute activations in the backward pass: less memory, about 30% more compute (QLoRA's default)."
            )
        },
    )


class QLoraTrainer(LoraTrainer):
    name = "qlora"
    description = "LoRA on a 4-bit NF4 base loaded with bitsandbytes (double quantization, bf16 compute where fast)."
    config_class = QLoraTrainingConfig

    def load_model(self, job: TrainJob):
        import torch
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=job.config.double_quant,
            bnb_4bit_compute_dtype=torch.bfloat16 if fast_bf16() else torch.float32,
        )
        model = load_causal_lm(job, quantization_config=quantization, device_map={"": 0} if on_gpu() else "cpu")
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=job.config.gradient_checkpointing)


@hookimpl
def register_trainers(register):
    register(QLoraTrainer)
