"""What every trainer shares: the config surface, the job it receives, and the train-then-publish flow."""

from __future__ import annotations

import dataclasses
import os
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loraflow.hub.base import BaseModel, cache_dir, resolve_base
from loraflow.hub.data import DEFAULT_SPLIT, check_lengths, load_data, split_records, strip_line_numbers
from loraflow.hub.devices import fast_bf16
from loraflow.hub.errors import LoraflowError
from loraflow.hub.plugins import get_plugins
from loraflow.hub.registry import AdapterVersion, Registry, check_name

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
# TRL's own integrations (TrainingArguments.report_to), and the package each needs.
TRACKERS = {"none": None, "tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb", "mlflow": "mlflow"}
# trackio's project; wandb and mlflow take theirs from WANDB_PROJECT and MLFLOW_EXPERIMENT_NAME.
TRACKING_PROJECT = "loraflow"


@dataclass
class TrainingConfig:
    """Hyperparameters every trainer takes. Defaults suit a 2-core CPU and SmolLM2-135M."""

    learning_rate: float = field(
        default=2e-4,
        metadata={"help": "Step size of each weight update. LoRA tolerates 1e-4 to 5e-4; full fine-tuning wants 1e-5."},
    )
    lr_scheduler_type: str = field(
        default="cosine",
        metadata={"help": f"How the learning rate changes over training: {', '.join(SCHEDULERS)}."},
    )
    warmup_ratio: float = field(
        default=0.05,
        metadata={"help": "Fraction of steps spent ramping the learning rate up from zero."},
    )
    num_train_epochs: float = field(
        default=1.0,
        metadata={"help": "Passes over the training data (ignored when max_steps > 0)."},
    )
    max_steps: int = field(
        default=-1,
        metadata={"help": "Stop after this many optimizer steps; -1 trains for num_train_epochs."},
    )
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Examples per step on each device."})
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={"help": "Steps whose gradients add up before one update (effective batch = batch size x this)."},
    )
    max_length: int = field(
        default=256,
        metadata={"help": "Longest example in tokens; longer ones are refused before training."},
    )
    seed: int = field(default=42, metadata={"help": "Random seed for the data split, initialisation and sampling."})
    eval_split: float = field(
        default=0.1,
        metadata={"help": "Fraction of the data held out to measure eval loss (0 disables)."},
    )
    lora_r: int = field(
        default=8,
        metadata={"help": "LoRA rank: the width of the low-rank update. Higher learns more and costs more."},
    )
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator; the update is scaled by alpha / r."})
    lora_dropout: float = field(
        # 0 by default: on the CPU, drawing the dropout masks took 10% of a LoRA step, and held-out quality was the
        # same without them (bench/train_throughput.py).
        default=0.0,
        metadata={"help": "Dropout on the LoRA path during training; 0.05 to 0.1 can curb overfitting on small data."},
    )
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={"help": "Module names LoRA adapts, or 'all-linear'."},
    )
    logging_steps: int = field(default=1, metadata={"help": "Record the loss every this many steps."})
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute activations in the backward pass: less memory, about 30% more compute."},
    )
    bf16: bool = field(
        # On where bf16 is native (a bf16 GPU, a CPU with AVX512-BF16 or AMX): 1.8x fp32 there. Off where PyTorch
        # would emulate it (an AVX2-only CPU), which is many times slower than fp32.
        default_factory=fast_bf16,
        metadata={
            "help": (
                "bf16 mixed precision (autocast, fp32 weights). The default is this machine's: on where bf16 is "
                "native (a bf16 GPU, or a CPU with AVX512-BF16 or AMX, about 1.8x faster), off where it is emulated. "
                "--bf16 false keeps fp32."
            )
        },
    )

    report_to: str = field(
        default="none",
        metadata={
            "help": (
                f"Where TRL logs the run: {', '.join(TRACKERS)}. TensorBoard writes under the run's folder; the run's "
                "log folder, URL or name is recorded in the registry and the model card."
            )
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = [part.strip() for part in self.lora_target_modules.split(",") if part.strip()]
        checks = [
            (self.learning_rate > 0, "learning_rate must be positive"),
            (self.lr_scheduler_type in SCHEDULERS, f"lr_scheduler_type must be one of {', '.join(SCHEDULERS)}"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            (self.num_train_epochs > 0 or self.max_steps > 0, "train for num_train_epochs > 0 or max_steps > 0"),
            (self.per_device_train_batch_size >= 1, "per_device_train_batch_size must be at least 1"),
            (self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be at least 1"),
            (self.max_length >= 8, "max_length must be at least 8 tokens"),
            (0 <= self.eval_split < 1, "eval_split must be in [0, 1)"),
            (self.lora_r >= 1, "lora_r must be at least 1"),
            (self.lora_alpha >= 1, "lora_alpha must be at least 1"),
            (0 <= self.lora_dropout < 1, "lora_dropout must be in [0, 1)"),
            (bool(self.lora_target_modules), "lora_target_modules must name at least one module"),
            (self.report_to in TRACKERS, f"report_to must be one of {', '.join(TRACKERS)}"),
        ]
        problems = [message for ok, message in checks if not ok] or _missing_tracker(self.report_to)
        if problems:
            raise LoraflowError(f"{type(self).__name__}: " + "; ".join(problems))

    @property
    def peft_target_modules(self) -> list[str] | str:
        return "all-linear" if self.lora_target_modules == ["all-linear"] else self.lora_target_modules


def _missing_tracker(report_to: str) -> list[str]:
    """Checked when the config is made, so a missing package fails before any data or model loads."""
    if report_to == "none":
        return []
    from transformers.integrations import get_available_reporting_integrations

    if report_to in get_available_reporting_integrations():
        return []
    return [f"report_to {report_to} needs the {TRACKERS[report_to]} package: pip install {TRACKERS[report_to]}"]


def config_fields(config_class: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(config_class) if f.init]


def load_config(config_class: type, yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None):
    """YAML file first, then command-line overrides; unknown keys are errors that name the file and line."""
    values: dict[str, Any] = {}
    known = {f.name for f in config_fields(config_class)}
    if yaml_path:
        path = Path(yaml_path)
        if not path.is_file():
            raise LoraflowError(f"{path}: no such config file.")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            line = path.read_bytes()[: error.start].count(b"\n") + 1
            message = f"{path}:{line}: byte {error.start} is not UTF-8; save the config as UTF-8 YAML."
            raise LoraflowError(message) from None
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            line = getattr(getattr(error, "problem_mark", None), "line", -1) + 1
            raise LoraflowError(f"{path}:{line}: not valid YAML ({getattr(error, 'problem', error)}).") from None
        if not isinstance(loaded, dict):
            raise LoraflowError(f"{path}: a config file is a mapping of field: value.")
        lines = text.splitlines()
        for key, value in loaded.items():
            normalized = str(key).replace("-", "_")
            if normalized not in known:
                line = next((i for i, text in enumerate(lines, 1) if text.lstrip().startswith(f"{key}:")), 0)
                raise LoraflowError(
                    f"{path}:{line}: unknown field {key!r} for {config_class.__name__}; "
                    f"known fields: {', '.join(sorted(known))}."
                )
            values[normalized] = value
    values.update({key: value for key, value in (overrides or {}).items() if value is not None})
    return config_class(**{key: _coerce(config_class, key, value) for key, value in values.items()})


def _coerce(config_class: type, key: str, value: Any) -> Any:
    """YAML reads `2e-4` as a string (YAML 1.1 wants `2.0e-4`); numbers and booleans follow the field's type."""
    wanted = typing.get_type_hints(config_class).get(key)
    if not isinstance(value, str) or wanted not in (int, float, bool):
        return value
    if wanted is bool and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    try:
        return wanted(value)
    except ValueError:
        raise LoraflowError(f"{config_class.__name__}.{key} must be a {wanted.__name__}, not {value!r}.") from None


@dataclass
class TrainJob:
    """Everything a trainer's `train` receives. Records are validated; the eval split is already taken."""

    base: BaseModel
    config: TrainingConfig
    name: str
    train_records: list[dict]
    eval_records: list[dict]
    output_dir: Path
    parent_dir: Path | None = None
    parent: AdapterVersion | None = None
    registry: Registry | None = None
    callbacks: list = field(default_factory=list)

    @property
    def run_name(self) -> str:
        """The run's name for the tracking integrations: its folder's name, unique per run."""
        return self.output_dir.name


def run_tracking(job: TrainJob) -> dict | None:
    """Where the integration put the run: TensorBoard's log folders, a W&B run URL, an MLflow run; else its name."""
    report_to = job.config.report_to
    if report_to == "none":
        return None
    location = f"{report_to} run {job.run_name}" + (f" in project {TRACKING_PROJECT}" if report_to == "trackio" else "")
    if report_to == "tensorboard":  # its event files name its log folders (PPO trains two stages, so two folders)
        folders = sorted({str(event.parent) for event in job.output_dir.rglob("events.out.tfevents.*")})
        location = ", ".join(folders) or str(job.output_dir)
    elif report_to == "wandb":
        import wandb

        location = wandb.run.url if wandb.run is not None else location
    elif report_to == "mlflow":
        import mlflow

        run = mlflow.last_active_run()
        location = f"{mlflow.get_tracking_uri()} run {run.info.run_id}" if run is not None else location
    return {"report_to": report_to, "location": location}


@dataclass
class Artifact:
    """A further adapter a trainer made beside its main one (PPO's reward model), published as NAME + name_suffix."""

    adapter_dir: Path
    name_suffix: str
    kind: str
    metrics: dict[str, float] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    # The main adapter's metrics key that receives this artifact's NAME@V, so a later run can reuse it.
    recorded_as: str | None = None


@dataclass
class TrainResult:
    """What a trainer returns: the PEFT adapter folder it wrote, what it measured, and any further artifacts.

    A trainer never publishes: run_training publishes the adapter and every extra artifact, from one process."""

    adapter_dir: Path
    metrics: dict[str, float]
    kind: str = "adapter"
    log_history: list[dict] = field(default_factory=list)
    extra_artifacts: list[Artifact] = field(default_factory=list)


def run_training(
    trainer_name: str,
    *,
    data: str | Path,
    name: str,
    base_spec: str,
    registry: Registry,
    config=None,
    parent: str | None = None,
    provenance: dict | None = None,
    promote: bool = False,
    actor: str = "user",
    split: str = DEFAULT_SPLIT,
    subset: str | None = None,
) -> AdapterVersion:
    """Validate data, resolve the base, train, then publish NAME (a candidate unless `promote`) and its artifacts.

    `data` is a local file or folder, or a Hub dataset id whose `split` and `subset` are read (see hub/data.py)."""
    import datasets
    import transformers

    from loraflow.hub.progress import ProgressCallback

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    info = get_plugins().trainer(trainer_name)
    trainer_class = info.trainer_class
    check_name(name)
    config = config or trainer_class.config_class()
    parent_version = registry.get(parent) if parent else None
    if parent_version and parent_version.kind == "prompt":
        raise LoraflowError(
            f"{parent_version.ref} is a prompt (a system prompt on the base), not an adapter to continue. Train "
            "without --parent, or from an adapter version; publish the result under a name of its own."
        )
    loaded = load_data(data, trainer_class.data_format, split=split, subset=subset)
    records = loaded.records
    base = resolve_base(base_spec)
    if parent_version and parent_version.base["fingerprint"] != base.fingerprint:
        raise LoraflowError(
            f"{parent_version.ref} was trained on {parent_version.base['name']}, not on {base.name}; "
            f"pass --base {parent_version.base['name']}."
        )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base.path)
    check_lengths(records, loaded.source, tokenizer, config.max_length, trainer_class.data_format)
    train_records, eval_records = split_records(records, config.eval_split, config.seed)
    output_dir = cache_dir() / "runs" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    job = TrainJob(
        base=base,
        config=config,
        name=name,
        train_records=strip_line_numbers(train_records),
        eval_records=strip_line_numbers(eval_records),
        output_dir=output_dir,
        parent_dir=registry.folder(parent_version) if parent_version else None,
        parent=parent_version,
        registry=registry,
        callbacks=[ProgressCallback(f"{trainer_name} → {name}")],
    )
    result = trainer_class().train(job)
    from accelerate import PartialState

    state = PartialState()
    if not state.is_main_process:  # under `accelerate launch` the main process alone writes cards and publishes
        state.wait_for_everyone()
        return registry.versions(name)[-1]
    publication = Publication(
        registry=registry,
        base=base,
        trainer={"name": trainer_name, "package": info.source.package, "version": info.source.version},
        parent=parent_version.ref if parent_version else None,
        data_summary={**loaded.summary(), "train_examples": len(train_records), "eval_examples": len(eval_records)},
        actor=actor,
        tracking=run_tracking(job),
    )
    try:
        version = publication.publish_all(result, name, config, provenance, promote)
    finally:  # the other ranks wait here even when publishing fails, so they exit instead of hanging
        state.wait_for_everyone()
    return version


@dataclass
class Publication:
    """What every artifact of one training run is published with; only the main process builds one."""

    registry: Registry
    base: BaseModel
    trainer: dict
    parent: str | None
    data_summary: dict
    actor: str
    tracking: dict | None = None  # {"report_to", "location"} when the run was logged to an integration

    def publish_all(self, result: TrainResult, name: str, config, provenance: dict | None, promote: bool):
        """Extra artifacts first, so the adapter's metrics can record their NAME@V; then the adapter itself."""
        from loraflow.hub.progress import save_loss_curve

        tracked = {"tracking": self.tracking} if self.tracking else {}
        provenance = {"data": self.data_summary, **tracked, **(provenance or {})}
        metrics = dict(result.metrics)
        for artifact in result.extra_artifacts:
            version = self.publish(
                artifact.adapter_dir,
                name + artifact.name_suffix,
                kind=artifact.kind,
                metrics=artifact.metrics,
                trainer={**self.trainer, "stage": artifact.kind},
                config=artifact.config,
                parent=None,
                provenance=provenance,
                promote=False,
            )
            if artifact.recorded_as:
                metrics[artifact.recorded_as] = version.ref
        if result.log_history:
            title = f"{name} ({self.trainer['name']})"
            save_loss_curve(result.log_history, result.adapter_dir / "loss_curve.png", title=title)
        return self.publish(
            result.adapter_dir,
            name,
            kind=result.kind,
            metrics=metrics,
            trainer=self.trainer,
            config=dataclasses.asdict(config),
            parent=self.parent,
            provenance=provenance,
            promote=promote,
        )

    def publish(
        self,
        folder: Path,
        name: str,
        *,
        kind: str,
        metrics: dict,
        trainer: dict,
        config: dict,
        parent: str | None,
        provenance: dict,
        promote: bool,
    ) -> AdapterVersion:
        """Write the model card into the folder, then publish it as the next version of `name`."""
        from loraflow.hub.hub_protocol import write_adapter_card

        tracked = {"tracking": self.tracking["location"]} if self.tracking else {}
        write_adapter_card(
            folder,
            name=name,
            base=self.base,
            trainer=trainer,
            config={**config, **tracked},
            metrics=metrics,
            parent=parent,
            data_summary=self.data_summary,
        )
        return self.registry.publish(
            folder,
            name,
            base=self.base,
            trainer=trainer,
            parent=parent,
            metrics=metrics,
            kind=kind,
            provenance=provenance,
            promote=promote,
            actor=self.actor,
        )
