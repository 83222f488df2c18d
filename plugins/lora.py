"""The `lora` trainer: supervised fine-tuning of a LoRA adapter with TRL's SFTTrainer and PEFT."""

from __future__ import annotations

from dataclasses import dataclass

from hub.hookspecs import hookimpl
from hub.training import TrainJob, TrainResult, TrainingConfig
from plugins.common import (
    final_metrics,
    finish_adapter,
    load_causal_lm,
    load_tokenizer,
    lora_config,
    messages_to_prompt_completion,
    quiet,
    trainer_arguments,
)


@dataclass
class LoraTrainingConfig(TrainingConfig):
    """The common hyperparameters; LoRA needs nothing more."""


class LoraTrainer:
    name = "lora"
    description = "Supervised fine-tuning of a LoRA adapter (TRL SFTTrainer + PEFT) on chat messages."
    config_class = LoraTrainingConfig
    data_format = "messages"

    def train(self, job: TrainJob) -> TrainResult:
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        tokenizer = load_tokenizer(job)
        eval_dataset = Dataset.from_list(messages_to_prompt_completion(job.eval_records)) if job.eval_records else None
        trainer = quiet(SFTTrainer(
            model=load_causal_lm(job),
            args=SFTConfig(**trainer_arguments(job), max_length=job.config.max_length, completion_only_loss=True),
            train_dataset=Dataset.from_list(messages_to_prompt_completion(job.train_records)),
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            peft_config=lora_config(job.config),
            callbacks=job.callbacks,
        ))
        trainer.train()
        metrics = final_metrics(trainer, job)
        adapter_dir = job.output_dir / "adapter"
        trainer.model.save_pretrained(adapter_dir)
        return TrainResult(finish_adapter(adapter_dir, job), metrics, log_history=trainer.state.log_history)


@hookimpl
def register_trainers(register):
    register(LoraTrainer)
