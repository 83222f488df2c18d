"""The `sft` trainer: full fine-tuning with TRL's SFTTrainer, then a LoRA adapter extracted from the weight delta.

Every weight is trained. A truncated SVD of each adapted linear layer's change (fine-tuned minus base)
gives the rank-r factors B·A closest to it (Eckart-Young), so the result hot-swaps like any adapter.
PEFT's `convert_to_lora` does the same SVD but only for PEFT layers, not for two plain checkpoints.
The full checkpoint stays in the run folder of the cache; only the extracted adapter is published.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loraflow.hub.errors import LoraflowError
from loraflow.hub.hookspecs import hookimpl
from loraflow.hub.training import TrainingConfig, TrainJob, TrainResult
from loraflow.plugins.common import (
    compute_dtype,
    final_metrics,
    load_causal_lm,
    load_tokenizer,
    no_grad,
    save_adapter,
    sft_trainer,
)

if TYPE_CHECKING:  # torch loads inside the functions that use it
    import torch

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class SftTrainingConfig(TrainingConfig):
    """Full fine-tuning wants a smaller learning rate than LoRA; the lora_* fields shape the extracted adapter."""

    learning_rate: float = field(
        default=2e-5,
        metadata={"help": "Step size of each weight update; full fine-tuning of every weight wants 1e-5 to 5e-5."},
    )
    extract_rank: int = field(
        default=16,
        metadata={"help": "Rank of the LoRA adapter extracted from the weight delta by truncated SVD."},
    )
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(PROJECTIONS),
        metadata={"help": "Linear layers whose weight change is extracted into the adapter, or 'all-linear'."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.extract_rank < 1:
            raise LoraflowError(f"{type(self).__name__}: extract_rank must be at least 1")


@no_grad
def low_rank_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """LoRA A (rank x in) and B (out x rank) with B @ A the best rank-r approximation of `delta`.

    Also returns the squared Frobenius norms of the residual and of delta, for the relative error.
    """
    import torch

    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    energy = s.square()
    lora_a, lora_b = vh[:rank].contiguous(), (u[:, :rank] * s[:rank]).contiguous()
    return lora_a, lora_b, energy[rank:].sum().item(), energy.sum().item()


def adapted_linears(model, targets: list[str]) -> dict[str, torch.nn.Linear]:
    """Linear layers whose last name part is a target ('all-linear': every linear layer but the output head)."""
    import torch

    every = targets == ["all-linear"]
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and "lm_head" not in name
        and (every or name.rsplit(".", 1)[-1] in targets)
    }


@no_grad
def extract_lora(tuned, base, rank: int, targets: list[str]):
    """Wrap `base` in a LoRA adapter of `rank` fitted to tuned - base; returns the PeftModel and the relative error."""
    from peft import LoraConfig, get_peft_model

    tuned_linears = adapted_linears(tuned, targets)
    if not tuned_linears:
        raise LoraflowError(
            f"no linear layer matches lora_target_modules {targets}; use names like {', '.join(PROJECTIONS)}"
        )
    smallest = min(min(module.weight.shape) for module in tuned_linears.values())
    if rank > smallest:
        raise LoraflowError(
            f"extract_rank {rank} exceeds the smallest adapted layer dimension ({smallest}); lower --extract-rank"
        )
    factors, residual, total = {}, 0.0, 0.0
    base_linears = adapted_linears(base, targets)
    for name, module in tuned_linears.items():
        # The tuned model sits where it trained (a GPU, say); the freshly loaded base on the CPU.
        delta = module.weight - base_linears[name].weight.to(module.weight.device)
        lora_a, lora_b, layer_residual, layer_total = low_rank_factors(delta, rank)
        factors[name] = (lora_a, lora_b)
        residual, total = residual + layer_residual, total + layer_total
    # alpha = r makes PEFT's scaling 1, so B @ A is exactly the fitted delta.
    target_modules = sorted({name.rsplit(".", 1)[-1] for name in factors})
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=target_modules)
    peft_model = get_peft_model(base, config)
    for name, module in peft_model.base_model.model.named_modules():
        if name in factors:
            lora_a, lora_b = factors[name]
            module.lora_A["default"].weight.copy_(lora_a)
            module.lora_B["default"].weight.copy_(lora_b)
    return peft_model, math.sqrt(residual / total) if total else 0.0


class SftTrainer:
    name = "sft"
    description = "Full fine-tuning (TRL SFTTrainer, every weight), then a LoRA adapter extracted by truncated SVD."
    config_class = SftTrainingConfig
    data_format = "messages"

    def load_model(self, job: TrainJob):
        """Every weight trains, so the base loads in compute_dtype() (fp32 on the CPU), not frozen in bf16."""
        return load_causal_lm(job, dtype=compute_dtype())

    def train(self, job: TrainJob) -> TrainResult:
        if job.parent_dir:
            raise LoraflowError(
                "sft fine-tunes the full base model and cannot continue an adapter; use lora or dpo with --parent"
            )
        tokenizer = load_tokenizer(job)
        trainer = sft_trainer(job, self.load_model(job), tokenizer)
        trainer.train()
        metrics = final_metrics(trainer, job)
        full_dir = job.output_dir / "full"
        trainer.save_model(str(full_dir))
        tokenizer.save_pretrained(full_dir)
        rank, targets = job.config.extract_rank, job.config.lora_target_modules
        peft_model, error = extract_lora(trainer.model, self.load_model(job), rank, targets)
        metrics["extract_rank"] = job.config.extract_rank
        metrics["extract_relative_error"] = error
        if job.eval_records:
            metrics["full_eval_loss"] = metrics.pop("eval_loss")
            # The adapter's eval loss is what a user gets when serving it, next to the full model's.
            metrics["eval_loss"] = sft_trainer(job, peft_model, tokenizer).evaluate()["eval_loss"]
        return TrainResult(save_adapter(peft_model, job), metrics, log_history=trainer.state.log_history)


@hookimpl
def register_trainers(register):
    register(SftTrainer)
