"""Building blocks the built-in trainers share: devices, model loading, LoRA settings, TRL arguments."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING

from loraflow.hub.devices import on_gpu
from loraflow.hub.training import TRACKING_PROJECT, TrainingConfig, TrainJob, TrainResult

if TYPE_CHECKING:  # torch loads inside the functions that use it
    import torch


def no_grad(function):
    """torch.no_grad() at call time: importing a trainer must not import torch, so `loraflow` starts fast."""

    @functools.wraps(function)
    def without_gradients(*args, **kwargs):
        import torch

        with torch.no_grad():
            return function(*args, **kwargs)

    return without_gradients


def compute_dtype() -> torch.dtype:
    """bf16 where the GPU supports it; fp32 weights on the CPU; --bf16 adds mixed precision there."""
    import torch

    return torch.bfloat16 if on_gpu() and torch.cuda.is_bf16_supported() else torch.float32


def load_tokenizer(job: TrainJob):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(job.base.path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def frozen_base_dtype(job: TrainJob) -> torch.dtype:
    """The dtype of a base whose weights stay frozen (every LoRA trainer): bf16 when training runs in bf16, since
    autocast would otherwise cast every frozen weight to bf16 again in every step (PEFT keeps the adapter's own
    weights in fp32 either way); compute_dtype() otherwise."""
    import torch

    return torch.bfloat16 if job.config.bf16 else compute_dtype()


def attention_implementation() -> str:
    """PyTorch's SDPA on a GPU; eager attention on the CPU, where the SDPA flash kernel's backward took 13% of a
    LoRA step on chat-length examples and eager trains 1.17x faster (bench/train_throughput.py)."""
    return "sdpa" if on_gpu() else "eager"


def load_causal_lm(job: TrainJob, **kwargs):
    """The base model, frozen for LoRA training; a trainer that updates its weights passes dtype=compute_dtype()."""
    from transformers import AutoModelForCausalLM

    kwargs.setdefault("dtype", frozen_base_dtype(job))
    kwargs.setdefault("attn_implementation", attention_implementation())
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
        # TRL's own integrations; TensorBoard writes under output_dir/runs/, inside the run's folder.
        report_to=config.report_to,
        run_name=job.run_name,
        project=TRACKING_PROJECT,
        disable_tqdm=True,
        use_cpu=not on_gpu(),
        bf16=config.bf16 or str(compute_dtype()) == "torch.bfloat16",
        dataloader_pin_memory=on_gpu(),
        gradient_checkpointing=config.gradient_checkpointing,
    )


def passes_over_data(job: TrainJob) -> float:
    """How many times training reads each example: num_train_epochs, or what max_steps' batches add up to."""
    config = job.config
    if config.max_steps > 0:
        examples = config.max_steps * config.per_device_train_batch_size * config.gradient_accumulation_steps
        return examples / max(len(job.train_records), 1)
    return config.num_train_epochs


def precompute_reference(job: TrainJob) -> bool:
    """TRL's precompute_ref_log_probs for DPO and KTO. The reference is frozen, so training that reads each example
    more than once (the loop's three passes) computes its log-probs once, before training, instead of running a
    reference forward in every step; at one pass or less, precomputing the whole dataset would cost more."""
    return passes_over_data(job) > 1


@functools.cache
def with_precise_reference(trainer_class):
    """TRL's DPOTrainer or KTOTrainer, computing the reference log-probs it precomputes (precompute_reference) in the
    precision its steps run in."""

    class PreciseReference(trainer_class):
        # The steps run under autocast and read fp32 logits (Accelerate wraps the model's forward so), but TRL
        # precomputes before that wrapping, so with a bf16 base its log-softmax ran on bf16 logits. The precomputed
        # reference then differed from the policy's own log-probs by rounding: a DPO margin of 0.003 (SmolLM2) to
        # 0.016 (the test model) before any step, where it must be 0.
        def compute_ref_log_probs(self, model, inputs):
            def logits_in_fp32(module, args, output):
                output.logits = output.logits.float()
                return output

            hook = model.register_forward_hook(logits_in_fp32)
            try:
                with self.accelerator.autocast():
                    return super().compute_ref_log_probs(model, inputs)
            finally:
                hook.remove()

    PreciseReference.__name__ = PreciseReference.__qualname__ = f"Precise{trainer_class.__name__}"
    return PreciseReference


def quiet(trainer):
    """Our progress bar replaces the Trainer's printed log dicts."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def messages_to_prompt_completion(records: list[dict]) -> list[dict]:
    """Split each conversation before its last (assistant) turn, so the loss covers only the answer."""
    return [{"prompt": record["messages"][:-1], "completion": record["messages"][-1:]} for record in records]


def preference_to_conversation(records: list[dict]) -> list[dict]:
    """Prompt/chosen/rejected strings as chat turns, so TRL applies the base's chat template to them."""
    return [
        {
            "prompt": [{"role": "user", "content": record["prompt"]}],
            "chosen": [{"role": "assistant", "content": record["chosen"]}],
            "rejected": [{"role": "assistant", "content": record["rejected"]}],
        }
        for record in records
    ]


def unpaired_to_conversation(records: list[dict]) -> list[dict]:
    """Prompt/completion strings as chat turns beside their label, so TRL applies the base's chat template to them."""
    return [
        {
            "prompt": [{"role": "user", "content": record["prompt"]}],
            "completion": [{"role": "assistant", "content": record["completion"]}],
            "label": record["label"],
        }
        for record in records
    ]


def sft_trainer(job: TrainJob, model, tokenizer, peft_config=None, **overrides):
    """TRL's SFTTrainer on the job's messages, loss on the answers only; lora, qlora and sft all use it."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    arguments = {
        **trainer_arguments(job),
        "max_length": job.config.max_length,
        "completion_only_loss": True,
        "loss_type": sft_loss_type(),
        **overrides,
    }
    eval_dataset = Dataset.from_list(messages_to_prompt_completion(job.eval_records)) if job.eval_records else None
    return quiet(
        SFTTrainer(
            model=model,
            args=SFTConfig(**arguments),
            train_dataset=Dataset.from_list(messages_to_prompt_completion(job.train_records)),
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=job.callbacks,
        )
    )


def sft_loss_type() -> str | None:
    """TRL's default loss (chunked_nll) on a GPU, where it bounds the logits' memory on long sequences; plain nll on
    the CPU, where chunked_nll copies the tied embedding to fp32 twice a step and recomputes the head in the
    backward pass: 19% of a LoRA step there, for logits of a few MiB at these batch sizes."""
    return None if on_gpu() else "nll"


def load_parent_adapter(job: TrainJob, model, is_trainable: bool = True):
    """Wrap `model` in the parent version's adapter, to continue training it."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(job.parent_dir), is_trainable=is_trainable)


def save_adapter(model, job: TrainJob, folder: str = "adapter") -> Path:
    """Save only the trained ("default") adapter; TRL may have added a frozen "ref" copy beside it."""
    adapter_dir = job.output_dir / folder
    # Our adapters never resize the vocabulary; "auto" would ask the Hub for the base's config to check.
    model.save_pretrained(adapter_dir, selected_adapters=["default"], save_embedding_layers=False)
    return finish_adapter(adapter_dir, job)


@no_grad
def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 16, batch_size: int = 16) -> list[str]:
    """Greedy answers to single-turn user prompts through the chat template, decoded without the prompt."""
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the last prompt token
    answers = []
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
                )
                for prompt in prompts[start : start + batch_size]
            ]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            output = model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            answers += tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return answers


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
    tokens = next((entry["num_tokens"] for entry in reversed(history) if "num_tokens" in entry), None)
    metrics = {
        "train_loss": summary.get("train_loss"),
        "train_runtime_s": summary.get("train_runtime"),
        "train_tokens": tokens,  # non-padding tokens the steps processed (TRL's count)
        "train_steps": trainer.state.global_step,
        "train_examples": len(job.train_records),
    }
    if job.eval_records:
        logged = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
        metrics["eval_loss"] = logged[-1] if logged else trainer.evaluate()["eval_loss"]
    return {key: value for key, value in metrics.items() if value is not None}


def policy_model(job: TrainJob):
    """The model to train and the peft_config to give TRL: with a parent, its adapter loaded trainable and no
    peft_config, so TRL freezes a copy of it as the reference; otherwise the base and a new LoRA."""
    model = load_causal_lm(job)
    if job.parent_dir:
        return load_parent_adapter(job, model), None
    return model, lora_config(job.config)


def train_and_evaluate(trainer, job: TrainJob, eval_metrics, logged_key: str) -> TrainResult:
    """Train, recording `eval_metrics` of the eval split before (`before_eval_*`) and after; `logged_key` finds the
    last evaluation TRL logged, so the final one is not computed twice."""
    has_eval = trainer.eval_dataset is not None
    before = eval_metrics(trainer.evaluate(), prefix="before_eval_") if has_eval else {}
    trainer.train()
    metrics = final_metrics(trainer, job)
    if has_eval:
        logged = [entry for entry in trainer.state.log_history if logged_key in entry]
        metrics |= before | eval_metrics(logged[-1] if len(logged) > 1 else trainer.evaluate())
    return TrainResult(save_adapter(trainer.model, job), metrics, log_history=trainer.state.log_history)
