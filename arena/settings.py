"""The arena's and the loop's settings: each default and help text is written here once, and the CLI reads them;
and `trainer_config`, which checks the loop's --set values against the trainer's config at start.

This module stays cheap to import (no torch, no database driver), because every `loraflow` command builds its
options from it.
"""

from __future__ import annotations

import difflib
import typing
from dataclasses import dataclass, field

from loraflow.hub.base import DEFAULT_BASE
from loraflow.hub.errors import LoraflowError


@dataclass(frozen=True)
class RateLimit:
    """At most `votes` per session within any `window_s` seconds."""

    votes: int = field(default=30, metadata={"help": "Votes one session may cast per window."})
    window_s: float = field(default=60.0, metadata={"help": "The rate limit's window in seconds."})


DEFAULT_SERVER = "http://127.0.0.1:8000"  # where `loraflow serve` listens by default
NO_API_KEY = "EMPTY"  # what the openai client sends to a server started without --api-key


@dataclass
class ArenaSettings:
    names: list[str]
    server_url: str
    api_key: str = NO_API_KEY
    include_base: bool = field(default=True, metadata={"help": "Let the base model compete as 'base'."})
    max_versions: int = 4
    focus_votes: int = field(
        default=20, metadata={"help": "Head-to-head votes a new version gets against its parent before others join."}
    )
    max_tokens: int = field(default=96, metadata={"help": "Longest answer in tokens."})
    temperature: float = 0.8
    base_model: str | None = None


@dataclass
class LoopSettings:
    name: str
    votes_needed: int = field(
        default=100, metadata={"help": "New decisive votes on the live version that start a retrain."}
    )
    min_win_rate: float | None = field(
        default=None,
        metadata={
            "help": "Promote only when the new version wins this share of its decisive votes against its parent; "
            "without it the new version goes live right after training."
        },
    )
    gate_votes: int = field(default=20, metadata={"help": "Decisive head-to-head votes the win-rate gate waits for."})
    base: str = field(default=DEFAULT_BASE, metadata={"help": "The base model the adapter was trained on."})
    trainer: str = "dpo"
    training_overrides: dict = field(default_factory=dict)
    poll_s: float = field(default=5.0, metadata={"help": "Seconds between looks at the vote store."})
    backoff_s: float = field(
        default=60.0, metadata={"help": "Seconds to wait after a failed training; doubled after each further failure."}
    )
    max_backoff_s: float = field(default=3600.0, metadata={"help": "The longest wait between two training attempts."})

    def __post_init__(self) -> None:
        if self.votes_needed < 1:
            raise LoraflowError(f"votes_needed is {self.votes_needed}; it must be at least 1.")
        if self.min_win_rate is not None and not 0 < self.min_win_rate < 1:
            raise LoraflowError(f"min_win_rate is {self.min_win_rate}; give a share between 0 and 1, e.g. 0.55.")
        if self.gate_votes < 1:
            raise LoraflowError(f"gate_votes is {self.gate_votes}; it must be at least 1.")
        if self.backoff_s < 0 or self.max_backoff_s < self.backoff_s:
            raise LoraflowError(
                f"backoff_s {self.backoff_s} and max_backoff_s {self.max_backoff_s}: "
                "need 0 <= backoff_s <= max_backoff_s."
            )


def trainer_config(trainer: str, overrides: dict):
    """The trainer's config with the --set values, built at start so a typo fails before the loop waits for votes."""
    from loraflow.hub.plugins import get_plugins
    from loraflow.hub.training import config_fields, load_config

    config_class = get_plugins().trainer(trainer).trainer_class.config_class
    known = sorted(f.name for f in config_fields(config_class))
    for key in overrides:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" Did you mean {close[0]}?" if close else ""
            raise LoraflowError(
                f"--set {key}: the {trainer} trainer has no setting {key!r}.{hint} Its settings: {', '.join(known)}."
            )
    config = load_config(config_class, None, overrides)
    hints = typing.get_type_hints(config_class)
    for key in overrides:
        # load_config converts strings only; YAML has already read `3.5` as a float and `yes` as a bool.
        if not fits(getattr(config, key), hints.get(key)):
            raise LoraflowError(
                f"--set {key}={overrides[key]!r}: {config_class.__name__}.{key} must be a {hints[key].__name__}."
            )
    return config


def fits(value, wanted) -> bool:
    """Whether a value suits an int, float or bool field; fields of other types check themselves."""
    if wanted is bool:
        return isinstance(value, bool)
    if wanted in (int, float) and isinstance(value, bool):
        return False
    if wanted is int:
        return isinstance(value, int)
    if wanted is float:
        return isinstance(value, (int, float))
    return True
