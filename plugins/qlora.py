"""The `qlora` trainer: a LoRA adapter trained on a 4-bit NF4 copy of the base (bitsandbytes), on CPU or GPU."""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass, field

from loraflow.hub.devices import fast_bf16, on_gpu
from loraflow.hub.hookspecs import hookimpl
from loraflow.hub.training import TrainJob
from loraflow.plugins.common import load_causal_lm
from loraflow.plugins.lora import LoraTrainer, LoraTrainingConfig

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


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
        from bitsandbytes.nn import Linear4bit
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        keep_large_allocations_out_of_the_heap()
        compute_dtype = torch.bfloat16 if fast_bf16() else torch.float32
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=job.config.double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
        )
        # Quantize from the checkpoint's own dtype: loading in fp32 first would copy every weight before quantizing it.
        model = load_causal_lm(
            job, quantization_config=quantization, device_map={"": 0} if on_gpu() else "cpu", dtype="auto"
        )
        for module in model.modules():
            if isinstance(module, Linear4bit):
                # Dequantize straight into the compute dtype; the checkpoint's bf16 would round an fp32 compute path.
                module.weight.quant_state.dtype = compute_dtype
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=job.config.gradient_checkpointing)


def keep_large_allocations_out_of_the_heap() -> None:
    """Pin glibc's mmap threshold at its 128 KiB default, for this process. Quantizing at load and every forward and
    backward dequantize each layer into fresh 0.4 to 3.4 MiB buffers; glibc's adaptive threshold would move buffers of
    that size into the heap, where freed ones stay resident: qlora's load then held as much memory as lora's fp32
    base (527 vs 522 MiB; 151 MiB with the threshold pinned, bench/train_memory.py). The price is a fresh mapping
    per buffer, a few percent of a step; memory is what qlora is chosen for."""
    libc = glibc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)


def glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name and "libc.so" in name else None


@hookimpl
def register_trainers(register):
    register(QLoraTrainer)
