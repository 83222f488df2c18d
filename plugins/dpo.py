"""The `dpo` trainer: Direct Preference Optimization of a LoRA adapter on prompt/chosen/rejected pairs (TRL DPOTrainer).

With a parent version it continues that adapter, and the reference is the parent itself: DPOTrainer,
given a PeftModel and no ref_model, copies the loaded adapter into a frozen "ref" adapter before training.
Without a parent it trains a new adapter, and the reference is the bare base (adapters disabled).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loraflow.hub.errors import LoraflowError
from loraflow.hub.hookspecs import hookimpl
from loraflow.hub.training import TrainingConfig, TrainJob, TrainResult
from loraflow.plugins.common import (
    load_tokenizer,
    policy_model,
    precompute_reference,
    preference_to_conversation,
    quiet,
    train_and_evaluate,
    trainer_arguments,
    with_precise_reference,
)

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "apo_zero", "apo_down")


@dataclass
class DpoTrainingConfig(TrainingConfig):
    """The common hyperparameters plus DPO's beta; preference tuning wants a smaller step than SFT."""

    learning_rate: float = field(
        default=5e-5,
        metadata={"help": "Step size of each update; DPO on LoRA works at 1e-5 to 1e-4."},
    )
    beta: float = field(
        default=0.1,
        metadata={"help": "How far the policy may move from the reference: higher keeps it closer (0.1 is usual)."},
    )
    loss_type: str = field(
        default="sigmoid",
        metadata={
            "help": (
                f"DPO's loss: {', '.join(LOSS_TYPES)}. sigmoid is the paper's; apo_zero also raises the chosen "
                "answers' likelihood, for chosen answers better than the model's own."
            )
        },
    )

    use_weighting: bool = field(
        default=False,
        metadata={
            "help": "Weigh each pair by how likely the policy is to write its answers (WPO), so pairs of answers from "
            "other models count less than pairs of the policy's own."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta <= 0:
            raise LoraflowError(f"{type(self).__name__}: beta must be positive")
        if self.loss_type not in LOSS_TYPES:
            raise LoraflowError(f"{type(self).__name__}: loss_type must be one of {', '.join(LOSS_TYPES)}")


def preference_metrics(evaluation: dict, prefix: str = "eval_") -> dict[str, float]:
    return {
        f"{prefix}reward_accuracy": evaluation["eval_rewards/accuracies"],
        f"{prefix}reward_margin": evaluation["eval_rewards/margins"],
    }


class DpoTrainer:
    name = "dpo"
    description = (
        "Direct Preference Optimization (TRL DPOTrainer) of a LoRA adapter; --parent continues one against itself."
    )
    config_class = DpoTrainingConfig
    data_format = "preference"

    def train(self, job: TrainJob) -> TrainResult:
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer

        model, peft_config = policy_model(job)
        eval_dataset = Dataset.from_list(preference_to_conversation(job.eval_records)) if job.eval_records else None
        trainer = quiet(
            with_precise_reference(DPOTrainer)(
                model=model,
                args=DPOConfig(
                    **trainer_arguments(job),
                    max_length=job.config.max_length,
                    beta=job.config.beta,
                    loss_type=[job.config.loss_type],
                    use_weighting=job.config.use_weighting,
                    precompute_ref_log_probs=precompute_reference(job),
                ),
                train_dataset=Dataset.from_list(preference_to_conversation(job.train_records)),
                eval_dataset=eval_dataset,
                processing_class=load_tokenizer(job),
                peft_config=peft_config,
                callbacks=job.callbacks,
            )
        )
        return train_and_evaluate(trainer, job, preference_metrics, "eval_rewards/accuracies")


@hookimpl
def register_trainers(register):
    register(DpoTrainer)
