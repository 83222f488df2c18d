"""loraflow: train, publish, serve, vote on and retrain LoRA adapters for one quantized base model.

The public API for plugin authors: import these names from `loraflow` and nothing deeper.

    hookimpl        marks a plugin's hook implementation, e.g. `register_trainers(register)`
    hookspec        marks a hook specification (for tools that extend loraflow's own hooks)
    TrainingConfig  the dataclass of hyperparameters every trainer takes; subclass it for more fields
    TrainJob        what `train(job)` receives: base, config, name, train/eval records, output_dir, parent
    TrainResult     what `train(job)` returns: the adapter folder, its metrics, the loss history and any
                    `extra_artifacts`; loraflow publishes them, a trainer never writes the registry itself
    Artifact        one extra adapter beside the main one (e.g. a reward model), published as NAME + name_suffix
    LoraflowError   raise it for a problem the user can fix; the CLI prints its message without a traceback

A trainer plugin is a module that implements a hook:

    from loraflow import TrainingConfig, TrainResult, hookimpl

    class MyTrainer:
        name, description = "mine", "One line that `loraflow plugins list` shows."
        config_class, data_format = TrainingConfig, "messages"  # or "preference", "unpaired", "text"

        def train(self, job):
            ...  # write a PEFT LoRA adapter folder under job.output_dir
            return TrainResult(job.output_dir, {"examples_seen": len(job.train_records)})

    @hookimpl
    def register_trainers(register):
        register(MyTrainer)

and declares it in its pyproject.toml under `[project.entry-points.loraflow]`. Every hook is documented in
loraflow.hub.hookspecs. Everything else lives in `loraflow.hub` (registry, bases, data, CLI), `loraflow.plugins`
(built-in trainers), `loraflow.serve` (vLLM serving) and `loraflow.arena` (votes, ratings and the feedback loop);
those modules may change between versions.
"""

from loraflow.hub.errors import LoraflowError
from loraflow.hub.hookspecs import hookimpl, hookspec
from loraflow.hub.training import Artifact, TrainingConfig, TrainJob, TrainResult

__all__ = ["Artifact", "LoraflowError", "TrainJob", "TrainResult", "TrainingConfig", "hookimpl", "hookspec"]
