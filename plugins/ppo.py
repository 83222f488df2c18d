"""The `ppo` trainer: RLHF as the fine-tuning guide teaches it, in two stages.

1. A reward model learned from preference pairs: sequence classification with a LoRA adapter (TRL
   RewardTrainer), returned as an extra artifact that run_training publishes as NAME-reward, of kind "reward",
   so `--reward` can reuse it. When the run continues a parent and NAME-reward already has a version on this
   base, its newest version is trained further on the new pairs instead of a new one from scratch: the reward
   model accumulates what every round of votes taught. `--reward` reuses a reward model without training.
2. PPO (trl.experimental.ppo) of a LoRA policy against that reward, with a value model initialised from
   the reward model and a KL penalty to the reference. Without a parent the policy is a new adapter and the
   reference is the base (the policy with its adapter disabled). With a parent the policy continues the parent's
   adapter, and the reference is the parent itself: a frozen copy with the adapter merged into the base, handed
   to PPOTrainer as ref_model (disabling the adapter would give the base, not the parent).
The output is the policy adapter; its metrics hold the mean reward on held-out prompts before and after.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field

from loraflow.hub.errors import LoraflowError
from loraflow.hub.hookspecs import hookimpl
from loraflow.hub.registry import AdapterVersion
from loraflow.hub.training import Artifact, TrainingConfig, TrainJob, TrainResult
from loraflow.plugins.common import (
    compute_dtype,
    final_metrics,
    generate_answers,
    load_causal_lm,
    load_parent_adapter,
    load_tokenizer,
    lora_config,
    no_grad,
    preference_to_conversation,
    quiet,
    save_adapter,
    trainer_arguments,
)

# SmolLM2 pads with its end-of-turn token, which also appears inside every chat prompt; PPO masks pads by id.
PAD_CANDIDATES = ("<|endoftext|>", "<pad>", "<unk>")
REWARD_SUFFIX = "-reward"  # NAME's reward model is published as NAME-reward


@dataclass
class PpoTrainingConfig(TrainingConfig):
    """The common fields set the policy's PPO updates; the reward_* fields set stage 1."""

    learning_rate: float = field(default=5e-5, metadata={"help": "Step size of the policy (and value) updates."})
    kl_coef: float = field(
        default=0.05,
        metadata={"help": "Weight of the KL penalty that keeps the policy near the reference model."},
    )
    response_length: int = field(default=16, metadata={"help": "Tokens generated per prompt in each PPO rollout."})
    total_episodes: int = field(default=64, metadata={"help": "Prompts rolled out over the whole PPO run."})
    num_ppo_epochs: int = field(default=2, metadata={"help": "Optimisation passes over each batch of rollouts."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature of the rollouts."})
    reward: str | None = field(
        default=None,
        metadata={"help": "Reuse this reward adapter (NAME@V of kind 'reward') instead of training one."},
    )
    reward_learning_rate: float = field(
        default=2e-4,
        metadata={"help": "Step size of the reward model's LoRA training."},
    )
    reward_max_steps: int = field(
        default=-1,
        metadata={"help": "Optimizer steps of reward training; -1 trains for num_train_epochs."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = [
            (self.kl_coef >= 0, "kl_coef must be zero or positive"),
            (self.response_length >= 1, "response_length must be at least 1"),
            (self.total_episodes >= self.per_device_train_batch_size, "total_episodes must be at least one batch"),
            (self.num_ppo_epochs >= 1, "num_ppo_epochs must be at least 1"),
            (self.temperature > 0, "temperature must be positive"),
            (self.reward_learning_rate > 0, "reward_learning_rate must be positive"),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise LoraflowError(f"{type(self).__name__}: " + "; ".join(problems))


def policy_loss_as_loss():
    """PPO logs no plain "loss"; show the policy-gradient loss in its place on the progress bar."""
    from transformers import TrainerCallback

    class PolicyLossAsLoss(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss/policy_avg" in logs:
                logs.setdefault("loss", logs["loss/policy_avg"])

    return PolicyLossAsLoss()


def ppo_tokenizer(job: TrainJob):
    tokenizer = load_tokenizer(job)
    vocabulary = tokenizer.get_vocab()
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.pad_token = next((token for token in PAD_CANDIDATES if token in vocabulary), tokenizer.pad_token)
    return tokenizer


def load_reward_base(job: TrainJob, tokenizer):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(job.base.path, num_labels=1, dtype=compute_dtype())
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def previous_reward(job: TrainJob) -> AdapterVersion | None:
    """The reward model a continued policy's reward continues: NAME-reward's newest version on this base, if any.

    The newest, not the live one: only a name's first version goes live on publishing, later reward versions stay
    candidates. Without a parent there is none, so a new policy always gets a new reward model."""
    if job.parent is None or job.registry is None:
        return None
    snapshot = job.registry.snapshot()
    name = job.name + REWARD_SUFFIX
    if not snapshot.has(name):
        return None
    versions = [
        version
        for version in snapshot.versions(name)
        if version.kind == "reward" and version.base["fingerprint"] == job.base.fingerprint
    ]
    return versions[-1] if versions else None


def train_reward_model(job: TrainJob, tokenizer, previous: AdapterVersion | None = None):
    """Stage 1: LoRA reward model on the preference pairs, a new one or `previous` trained further; returns it
    (merged), its adapter folder and its metrics."""
    from datasets import Dataset
    from peft import PeftModel
    from trl import RewardConfig, RewardTrainer

    config = job.config
    arguments = trainer_arguments(job) | {
        "output_dir": str(job.output_dir / "reward-checkpoints"),
        "learning_rate": config.reward_learning_rate,
        "max_steps": config.reward_max_steps,
    }
    model = load_reward_base(job, tokenizer)
    if previous is None:
        peft_config = lora_config(config, task_type="SEQ_CLS")
    else:
        # No peft_config: RewardTrainer trains the loaded adapter (its LoRA and its score head) as it is.
        folder = str(job.registry.folder(previous))
        model, peft_config = PeftModel.from_pretrained(model, folder, is_trainable=True), None
    eval_dataset = Dataset.from_list(preference_to_conversation(job.eval_records)) if job.eval_records else None
    trainer = quiet(
        RewardTrainer(
            model=model,
            args=RewardConfig(**arguments, max_length=config.max_length),
            train_dataset=Dataset.from_list(preference_to_conversation(job.train_records)),
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=job.callbacks,
        )
    )
    trainer.train()
    metrics = final_metrics(trainer, job)
    if eval_dataset is not None:
        evaluation = trainer.evaluate()
        metrics |= {"eval_accuracy": evaluation["eval_accuracy"], "eval_margin": evaluation["eval_margin"]}
    if previous is not None:
        metrics["continued_from"] = previous.ref
    folder = save_adapter(trainer.model, job, folder="reward")
    return trainer.model.merge_and_unload(), folder, metrics


def load_reward_model(job: TrainJob, tokenizer):
    """A published reward adapter, merged into a fresh sequence-classification copy of the base."""
    from peft import PeftModel

    version = job.registry.get(job.config.reward)
    if version.kind != "reward":
        raise LoraflowError(
            f"{version.ref} is a {version.kind}, not a reward model; "
            "give --reward a version published by the ppo trainer"
        )
    if version.base["fingerprint"] != job.base.fingerprint:
        raise LoraflowError(f"{version.ref} was trained on {version.base['name']}, not on {job.base.name}")
    reward_model = PeftModel.from_pretrained(load_reward_base(job, tokenizer), str(job.registry.folder(version)))
    return reward_model.merge_and_unload(), version


@no_grad
def mean_reward(policy, reward_model, tokenizer, prompts: list[str], response_length: int) -> float:
    """Greedy answers to held-out prompts, scored by the reward model on the full chat, averaged."""
    answers = generate_answers(policy, tokenizer, prompts, max_new_tokens=response_length)
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], tokenize=False
        )
        for prompt, answer in zip(prompts, answers)
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(reward_model.device)
    reward_model.eval()
    return reward_model(**batch).logits.squeeze(-1).float().mean().item()


def load_ppo_base(job: TrainJob):
    """PPO's policy and reference in compute_dtype(), not frozen in bf16: the reference merges the parent into its
    weights, and a bf16 merge would put rounding error into the KL penalty from the first rollout on."""
    return load_causal_lm(job, dtype=compute_dtype())


def reference_model(job: TrainJob):
    """The frozen KL reference: the parent merged into a copy of the base, or None (the base: the policy with its
    adapter disabled), or a frozen copy of the base when distributed.

    TRL 1.12's PPOTrainer disables the adapter through `self.model.policy`, which a DistributedDataParallel
    wrapper hides (AttributeError under `accelerate launch`), so several processes need their own reference."""
    from accelerate import PartialState

    if job.parent_dir:
        reference = load_parent_adapter(job, load_ppo_base(job), is_trainable=False).merge_and_unload()
    elif PartialState().num_processes > 1:
        reference = load_ppo_base(job)
    else:
        return None
    return reference.eval().requires_grad_(False)


def rollout_dataset(records: list[dict], tokenizer):
    from datasets import Dataset

    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": record["prompt"]}],
            tokenize=True,
            add_generation_prompt=True,
            return_dict=False,
        )
        for record in records
    ]
    return Dataset.from_list([{"input_ids": list(ids)} for ids in prompts])


class PpoTrainer:
    name = "ppo"
    description = (
        "RLHF: a LoRA reward model (TRL RewardTrainer) from preference pairs, then PPO of a LoRA policy; "
        "--parent continues the policy against itself, and the newest NAME-reward on the new pairs."
    )
    config_class = PpoTrainingConfig
    data_format = "preference"

    def train(self, job: TrainJob) -> TrainResult:
        from trl.experimental.ppo import PPOConfig, PPOTrainer

        config = job.config
        tokenizer = ppo_tokenizer(job)
        metrics: dict[str, float] = {}
        extra_artifacts = []
        if config.reward:
            reward_model, reward_version = load_reward_model(job, tokenizer)
            metrics["reward_model"] = reward_version.ref
        else:
            reward_model, reward_folder, reward_metrics = train_reward_model(job, tokenizer, previous_reward(job))
            metrics |= {f"reward_{key}": value for key, value in reward_metrics.items()}
            extra_artifacts.append(reward_artifact(job, reward_folder, reward_metrics))
        held_out_records = job.eval_records or job.train_records[: config.per_device_train_batch_size]
        held_out = [record["prompt"] for record in held_out_records]
        policy = load_ppo_base(job)
        if job.parent_dir:
            # No peft_config: PPOTrainer trains the parent's adapter itself; the reference is a frozen copy of it.
            policy, peft_config = load_parent_adapter(job, policy), None
        else:
            peft_config = lora_config(config)
        metrics["mean_reward_before"] = mean_reward(policy, reward_model, tokenizer, held_out, config.response_length)

        tokenizer.padding_side = "left"  # rollouts continue from the end of each prompt
        arguments = trainer_arguments(job)
        for unused in ("max_steps", "eval_strategy"):  # PPO counts episodes and has no eval loop
            arguments.pop(unused)
        trainer = PPOTrainer(
            args=PPOConfig(
                **arguments,
                kl_coef=config.kl_coef,
                response_length=config.response_length,
                total_episodes=config.total_episodes,
                num_ppo_epochs=config.num_ppo_epochs,
                temperature=config.temperature,
                stop_token="eos",
                num_sample_generations=0,
                local_rollout_forward_batch_size=config.per_device_train_batch_size,
            ),
            processing_class=tokenizer,
            model=policy,
            ref_model=reference_model(job),
            reward_model=reward_model,
            value_model=copy.deepcopy(reward_model),
            train_dataset=rollout_dataset(job.train_records, tokenizer),
            eval_dataset=rollout_dataset(job.eval_records or job.train_records[:1], tokenizer),
            peft_config=peft_config,
            callbacks=[policy_loss_as_loss(), *job.callbacks],
        )
        quiet(trainer).train()
        policy_model = trainer.model.policy if hasattr(trainer.model, "policy") else trainer.policy_model
        metrics["mean_reward_after"] = mean_reward(
            policy_model, reward_model, tokenizer, held_out, config.response_length
        )
        history = trainer.state.log_history
        metrics |= {
            "train_steps": trainer.state.global_step,
            "train_examples": len(job.train_records),
            "final_kl": next(
                (entry["objective/kl"] for entry in reversed(history) if "objective/kl" in entry), float("nan")
            ),
        }
        # The loss-curve plot and progress bar read "loss"; PPO's counterpart is the policy-gradient loss.
        curve = [{**entry, "loss": entry["loss/policy_avg"]} for entry in history if "loss/policy_avg" in entry]
        return TrainResult(save_adapter(policy_model, job), metrics, log_history=curve, extra_artifacts=extra_artifacts)


def reward_artifact(job: TrainJob, folder, metrics: dict) -> Artifact:
    """The reward adapter, published by run_training as NAME-reward; the policy's metrics record its NAME@V."""
    config = job.config
    lora = {"lora_r": config.lora_r, "lora_target_modules": config.lora_target_modules}
    if "continued_from" in metrics:  # a continued adapter keeps the shape it was first trained with
        saved = json.loads((folder / "adapter_config.json").read_text())
        lora = {"lora_r": saved["r"], "lora_target_modules": saved["target_modules"]}
        lora["continued_from"] = metrics["continued_from"]
    return Artifact(
        adapter_dir=folder,
        name_suffix=REWARD_SUFFIX,
        kind="reward",
        metrics=metrics,
        config={"learning_rate": config.reward_learning_rate, **lora},
        recorded_as="reward_model",
    )


@hookimpl
def register_trainers(register):
    register(PpoTrainer)
