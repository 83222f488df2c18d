"""The `lora` trainer: supervised fine-tuning of a LoRA adapter with TRL's SFTTrainer and PEFT."""

from __future__ import annotations

from dataclasses import dataclass

from loraflow.hub.hookspecs import hookimpl
from loraflow.hub.training import TrainingConfig, TrainJob, TrainResult
from loraflow.plugins.common import (
    final_metrics,
    load_causal_lm,
    load_parent_adapter,
    load_tokenizer,
    lora_config,
    save_adapter,
    sft_trainer,
)


@dataclass
class LoraTrainingConfig(TrainingConfig):
    """The common hyperparameters; LoRA needs nothing more."""


class LoraTrainer:
    name = "lora"
    description = "Supervised fine-tuning of a LoRA adapter (TRL SFTTrainer + PEFT) on chat messages."
    config_class = LoraTrainingConfig
    data_format = "messages"

    def load_model(self, job: TrainJob):
        return load_causal_lm(job)

    def train(self, job: TrainJob) -> TrainResult:
        model = self.load_model(job)
        # A parent adapter keeps its own LoRA shape; the lora_* fields apply to new adapters only.
        if job.parent_dir:
            model, peft_config = load_parent_adapter(job, model), None
        else:
            peft_config = lora_config(job.config)
        trainer = sft_trainer(job, model, load_tokenizer(job), peft_config=peft_config)
        trainer.train()
        metrics = final_metrics(trainer, job)
        return TrainResult(save_adapter(trainer.model, job), metrics, log_history=trainer.state.log_history)


@hookimpl
def register_trainers(register):
    register(LoraTrainer)
