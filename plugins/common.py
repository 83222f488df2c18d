"""Building blocks the built-in trainers share: devices, model loading, LoRA settings, TRL arguments."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hub.training import TrainJob, TrainingConfig


def on_gpu() -> bool:
    return torch.cuda.is_available()


def compute_dtype() -> torch.dtype:
    """bf16 where the GPU supports it; fp32 on the CPU, where bf16 training is slow and imprecise."""
    return torch.bfloat16 if on_gpu() and torch.cuda.is_bf16_supported() else torch.float32


def load_tokenizer(job: TrainJob):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(job.base.path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(job: TrainJob, **kwargs):
    from transformers import AutoModelForCausalLM

    kwargs.setdefault("dtype", compute_dtype())
    return AutoModelForCausalLM.from_pretrained(job.base.path, **kwargs)


def lora_config(config: TrainingConfig, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.peft_target_modules,
        task_type=task_type,
    )


def trainer_arguments(job: TrainJob) -> dict:
    """The TrainingArguments every TRL trainer here shares, from the common config."""
    config = job.config
    has_eval = bool(job.eval_records)
    return dict(
        output_dir=str(job.output_dir / "checkpoints"),
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_ratio,  # transformers 5 reads a float in [0, 1) as a ratio
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        seed=config.seed,
        logging_steps=config.logging_steps,
        eval_strategy="epoch" if has_eval else "no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=not on_gpu(),
        bf16=compute_dtype() == torch.bfloat16,
        dataloader_pin_memory=on_gpu(),
    )


def quiet(trainer):
    """Our progress bar replaces the Trainer's printed log dicts."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def messages_to_prompt_completion(records: list[dict]) -> list[dict]:
    """Split each conversation before its last (assistant) turn, so the loss covers only the answer."""
    return [{"prompt": record["messages"][:-1], "completion": record["messages"][-1:]} for record in records]


def finish_adapter(adapter_dir: Path, job: TrainJob) -> Path:
    """Point the adapter at the base's public id instead of a machine-local cache path."""
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = job.base.hub_id
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    return adapter_dir


def final_metrics(trainer, job: TrainJob) -> dict[str, float]:
    """Train loss, eval loss and throughput as the Trainer logged them."""
    history = trainer.state.log_history
    summary = next((entry for entry in reversed(history) if "train_runtime" in entry), {})
    metrics = {
        "train_loss": summary.get("train_loss"),
        "train_runtime_s": summary.get("train_runtime"),
        "train_steps": trainer.state.global_step,
        "train_examples": len(job.train_records),
    }
    if job.eval_records:
        logged = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
        metrics["eval_loss"] = logged[-1] if logged else trainer.evaluate()["eval_loss"]
    return {key: value for key, value in metrics.items() if value is not None}
