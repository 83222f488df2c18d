"""The `cpt` trainer: continued pre-training of a LoRA adapter, causal language modelling on raw domain text.

The fine-tuning guide's stage 2: the model learns to predict the next token of plain text, with no chat template
and no masked prompt. Documents are tokenized, joined with EOS between them and cut into `block_size` blocks
(TRL's "wrapped" packing); TRL's SFTTrainer then trains on every token of each block. A fraction of the blocks
(eval_split) is held out, unless the job already holds eval documents, and its perplexity, exp(eval loss), is
measured before and after training. Before training a new adapter is a no-op (LoRA's B starts at zero), so the
first number is the base's own, or the parent adapter's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from loraflow.hub.errors import LoraflowError
from loraflow.hub.hookspecs import hookimpl
from loraflow.hub.training import TrainingConfig, TrainJob, TrainResult
from loraflow.plugins.common import (
    final_metrics,
    load_causal_lm,
    load_parent_adapter,
    load_tokenizer,
    lora_config,
    quiet,
    save_adapter,
    sft_loss_type,
    trainer_arguments,
)


@dataclass
class CptTrainingConfig(TrainingConfig):
    """The common hyperparameters plus the packed block length; max_length is unused, as blocks are packed."""

    block_size: int = field(
        default=256,
        metadata={
            "help": (
                "Tokens per training block: documents are joined with EOS between them and cut into blocks of this "
                "length. 256 suits a 2-core CPU; longer blocks teach longer context and cost more per step."
            )
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block_size < 8:
            raise LoraflowError(f"{type(self).__name__}: block_size must be at least 8 tokens")


def pack_blocks(texts: list[str], tokenizer, block_size: int):
    """A Dataset of `input_ids` blocks of `block_size` tokens (the last may be shorter), EOS after each document."""
    from datasets import Dataset
    from trl import pack_dataset

    eos = tokenizer.eos_token_id

    def tokenize(batch: dict) -> dict:
        # verbose=False: a whole document is longer than the model's context on purpose; packing cuts it.
        ids = tokenizer(batch["text"], verbose=False)["input_ids"]
        return {"input_ids": [tokens if tokens[-1:] == [eos] else tokens + [eos] for tokens in ids]}

    tokenized = Dataset.from_dict({"text": texts}).map(tokenize, batched=True, remove_columns=["text"])
    return pack_dataset(tokenized, block_size, strategy="wrapped")


class CptTrainer:
    name = "cpt"
    description = "Continued pre-training of a LoRA adapter: next-token prediction on raw domain text, packed."
    config_class = CptTrainingConfig
    data_format = "text"

    def split_blocks(self, job: TrainJob, tokenizer):
        """Train and held-out blocks: the job's eval documents when it has some, else eval_split of the blocks."""
        config = job.config
        blocks = pack_blocks([record["text"] for record in job.train_records], tokenizer, config.block_size)
        if job.eval_records:
            return blocks, pack_blocks([record["text"] for record in job.eval_records], tokenizer, config.block_size)
        if config.eval_split <= 0 or len(blocks) < 2:
            return blocks, None
        held_out = min(len(blocks) - 1, max(1, round(len(blocks) * config.eval_split)))
        split = blocks.train_test_split(test_size=held_out, seed=config.seed)
        return split["train"], split["test"]

    def train(self, job: TrainJob) -> TrainResult:
        from trl import SFTConfig, SFTTrainer

        model = load_causal_lm(job)
        positions = getattr(model.config, "max_position_embeddings", None)
        if positions and job.config.block_size > positions:
            raise LoraflowError(
                f"block_size {job.config.block_size} is longer than {job.base.name}'s context of {positions} tokens; "
                f"pass --block-size {positions} or less."
            )
        tokenizer = load_tokenizer(job)
        train_blocks, eval_blocks = self.split_blocks(job, tokenizer)
        # A parent adapter keeps its own LoRA shape; the lora_* fields apply to new adapters only.
        if job.parent_dir:
            model, peft_config = load_parent_adapter(job, model), None
        else:
            peft_config = lora_config(job.config)
        arguments = {
            **trainer_arguments(job),
            "eval_strategy": "epoch" if eval_blocks is not None else "no",
            "max_length": job.config.block_size,
            "packing": False,  # the blocks are packed already, so the held-out split is a split of blocks
            "loss_type": sft_loss_type(),
        }
        trainer = quiet(
            SFTTrainer(
                model=model,
                args=SFTConfig(**arguments),
                train_dataset=train_blocks,
                eval_dataset=eval_blocks,
                processing_class=tokenizer,
                peft_config=peft_config,
                callbacks=job.callbacks,
            )
        )
        before = trainer.evaluate()["eval_loss"] if eval_blocks is not None else None
        trainer.train()
        metrics = final_metrics(trainer, job) | {"train_blocks": len(train_blocks)}
        if eval_blocks is not None:
            # The epoch-end evaluation already ran after the last step; evaluate again only if it did not.
            step = trainer.state.global_step
            history = trainer.state.log_history
            logged = [entry["eval_loss"] for entry in history if "eval_loss" in entry and entry.get("step") == step]
            after = logged[-1] if logged else trainer.evaluate()["eval_loss"]
            metrics |= {
                "eval_blocks": len(eval_blocks),
                "eval_loss": after,
                "perplexity_before": math.exp(before),
                "perplexity_after": math.exp(after),
            }
        return TrainResult(save_adapter(trainer.model, job), metrics, log_history=trainer.state.log_history)


@hookimpl
def register_trainers(register):
    register(CptTrainer)
