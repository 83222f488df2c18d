"""The `kto` trainer: Kahneman-Tversky Optimization of a LoRA adapter on prompt/completion/label data (TRL KTOTrainer).

Each example is one answer judged desirable (label true) or undesirable (label false), so it learns from what pairs
cannot hold: a tie (both answers good), a both-bad vote (both answers bad) and a single thumbs up or down.
KTO weighs each answer against a reference point, the policy's KL from the reference, which TRL estimates from
mismatched prompt/answer pairs inside each batch: a batch needs at least two examples, taken in the dataset's order.

With a parent version it continues that adapter, and the reference is the parent itself: KTOTrainer, given a
PeftModel and no ref_model, copies the loaded adapter into a frozen "ref" adapter before training.
Without a parent it trains a new adapter, and the reference is the bare base (adapters disabled).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from loraflow.hub.errors import LoraflowError
from loraflow.hub.hookspecs import hookimpl
from loraflow.hub.training import TrainingConfig, TrainJob, TrainResult
from loraflow.plugins.common import (
    load_tokenizer,
    policy_model,
    precompute_reference,
    quiet,
    train_and_evaluate,
    trainer_arguments,
    unpaired_to_conversation,
    with_precise_reference,
)


@dataclass
class KtoTrainingConfig(TrainingConfig):
    """The common hyperparameters plus KTO's beta and the weights of the two kinds of answer."""

    learning_rate: float = field(
        default=5e-5,
        metadata={"help": "Step size of each update; KTO on LoRA works at 1e-5 to 1e-4."},
    )
    beta: float = field(
        default=0.1,
        metadata={"help": "How far the policy may move from the reference: higher keeps it closer (0.1 is usual)."},
    )
    desirable_weight: float = field(
        default=1.0,
        metadata={
            "help": (
                "Weight of the loss on desirable answers (label true). With more undesirable than desirable answers, "
                "raise it so that desirable_weight x desirable answers is 1 to 4/3 times undesirable_weight x "
                "undesirable answers."
            )
        },
    )
    undesirable_weight: float = field(
        default=1.0,
        metadata={
            "help": (
                "Weight of the loss on undesirable answers (label false); lower it when they outnumber the desirable "
                "ones (see desirable_weight)."
            )
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = [
            (self.beta > 0, "beta must be positive"),
            (self.desirable_weight > 0, "desirable_weight must be positive"),
            (self.undesirable_weight > 0, "undesirable_weight must be positive"),
            # TRL refuses a batch of one: the KL estimate would pair each answer with itself.
            (self.per_device_train_batch_size >= 2, "per_device_train_batch_size must be at least 2 for KTO"),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise LoraflowError(f"{type(self).__name__}: " + "; ".join(problems))


def unpaired_metrics(evaluation: dict, prefix: str = "eval_") -> dict[str, float]:
    """KTO's implied rewards per kind of answer and its KL estimate; a kind absent from the eval split is left out."""
    names = {
        "reward_desirable": "eval_rewards/chosen",
        "reward_undesirable": "eval_rewards/rejected",
        "reward_margin": "eval_rewards/margins",
        "kl": "eval_kl",
    }
    return {f"{prefix}{name}": evaluation[key] for name, key in names.items() if key in evaluation}


def check_both_labels(records: list[dict]) -> None:
    """The data file holds both labels (hub.data checks it); the eval split may have taken every one of a kind."""
    desirable = sum(record["label"] for record in records)
    if 0 < desirable < len(records):
        return
    missing = "undesirable (label false)" if desirable else "desirable (label true)"
    raise LoraflowError(
        f"after the eval split, the {len(records)} training examples hold no {missing} answer; "
        "KTO needs both. Add more examples of that kind, or lower --eval-split."
    )


class KtoTrainer:
    name = "kto"
    description = (
        "Kahneman-Tversky Optimization (TRL KTOTrainer) of a LoRA adapter on answers labelled desirable or not; "
        "--parent continues one against itself."
    )
    config_class = KtoTrainingConfig
    data_format = "unpaired"

    def train(self, job: TrainJob) -> TrainResult:
        from datasets import Dataset
        from trl import KTOConfig, KTOTrainer

        check_both_labels(job.train_records)
        train_records = list(job.train_records)
        # TRL reads the data in order and pairs neighbours for the KL estimate: mix prompts and labels across batches.
        random.Random(job.config.seed).shuffle(train_records)
        model, peft_config = policy_model(job)
        eval_dataset = Dataset.from_list(unpaired_to_conversation(job.eval_records)) if job.eval_records else None
        trainer = quiet(
            with_precise_reference(KTOTrainer)(
                model=model,
                args=KTOConfig(
                    **trainer_arguments(job),
                    max_length=job.config.max_length,
                    beta=job.config.beta,
                    desirable_weight=job.config.desirable_weight,
                    undesirable_weight=job.config.undesirable_weight,
                    precompute_ref_log_probs=precompute_reference(job),
                ),
                train_dataset=Dataset.from_list(unpaired_to_conversation(train_records)),
                eval_dataset=eval_dataset,
                processing_class=load_tokenizer(job),
                peft_config=peft_config,
                callbacks=job.callbacks,
            )
        )
        return train_and_evaluate(trainer, job, unpaired_metrics, "eval_kl")


@hookimpl
def register_trainers(register):
    register(KtoTrainer)
