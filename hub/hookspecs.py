"""Every hook a loraflow plugin can implement."""

from __future__ import annotations

from typing import Callable

import click
import pluggy

hookspec = pluggy.HookspecMarker("loraflow")
hookimpl = pluggy.HookimplMarker("loraflow")


@hookspec
def register_trainers(register: Callable[[type], None]) -> None:
    """Register trainer classes.

    Receives `register`, a callback taking one trainer class: a class with a `name` (str), a
    `description` (one line), a `config_class` (a dataclass deriving from loraflow.TrainingConfig),
    a `data_format` ("messages", "preference", "unpaired" or "text") and a
    `train(job: loraflow.TrainJob) -> loraflow.TrainResult` method. Returns nothing; loraflow publishes what
    `train` returns.
    """


@hookspec
def register_judges(register: Callable[[type], None]) -> None:
    """Register judge classes: automatic voters that pick the better of two answers.

    Receives `register`, a callback taking one judge class: a class with a `name` (str), a `description`
    (one line), a constructor taking one `loraflow.arena.judge.JudgeSettings` (the judge model, its server
    and API key, for judges that ask a model) and a `judge(prompt, answer_a, answer_b) -> str` method
    returning a vote outcome: "a", "b", "tie" or "both_bad". Returns nothing; `loraflow votes simulate
    --judge NAME` and `loraflow judge A B --judge NAME` vote with it.
    """


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add subcommands to the `loraflow` command.

    Receives `cli`, the root click group; call `cli.add_command(...)` with click or Typer commands
    (a Typer app becomes one with `typer.main.get_command(app)`). Returns nothing. Keep imports
    inside the command bodies so `loraflow --help` stays fast.
    """
