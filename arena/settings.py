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


@dataclass(frozen=True)
class HygieneSettings:
    """Which stored votes count (loraflow.arena.hygiene): caps, pace and two tests against chance per session."""

    daily_cap: int = field(
        default=500,
        metadata={"help": "Votes one session may cast per UTC day; later ones that day are excluded (judges exempt)."},
    )
    min_interval_s: float = field(
        default=1.0,
        metadata={
            "help": "A vote sooner than this after the same session's previous one is excluded as rapid-fire: "
            "streaming two answers and reading them takes longer (judges exempt)."
        },
    )
    same_side_min_votes: int = field(
        default=12, metadata={"help": "Decisive votes a session needs before its A/B balance is tested."}
    )
    same_side_alpha: float = field(
        default=0.001,
        metadata={"help": "Exclude a session whose A/B split has a p-value under a fair coin below this."},
    )
    outlier_min_votes: int = field(
        default=20,
        metadata={"help": "Decisive votes on pairs other sessions voted on before a session's agreement is tested."},
    )
    outlier_alpha: float = field(
        default=0.001,
        metadata={
            "help": "Exclude a session that agrees with the other sessions' majority so rarely that both a voter "
            "like them and a coin would do so with a probability below this."
        },
    )

    def __post_init__(self) -> None:
        if self.daily_cap < 1 or self.same_side_min_votes < 1 or self.outlier_min_votes < 1:
            raise LoraflowError(
                f"hygiene: daily_cap {self.daily_cap}, same_side_min_votes {self.same_side_min_votes} and "
                f"outlier_min_votes {self.outlier_min_votes} must each be at least 1."
            )
        if self.min_interval_s < 0:
            raise LoraflowError(f"hygiene: min_interval_s is {self.min_interval_s}; give 0 or more seconds.")
        for name in ("same_side_alpha", "outlier_alpha"):
            if not 0 < getattr(self, name) < 1:
                raise LoraflowError(f"hygiene: {name} is {getattr(self, name)}; give a p-value between 0 and 1.")


HUMAN, AI, ALL = "human", "ai", "all"
VOTERS = (HUMAN, AI, ALL)  # whose votes a leaderboard counts: people's, judges' (AI feedback) or everyone's
VOTER_LABELS = {HUMAN: "people's", AI: "judges'", ALL: "everyone's"}
# A board each, people's first: a judge votes as often as it is asked, and its biases (the answer it reads first,
# length) are not people's, so mixed in it would outvote them.
DEFAULT_VOTERS = (HUMAN, AI)


def check_voters(voters: typing.Sequence[str]) -> tuple[str, ...]:
    """The voter groups asked for, each once, in their order; an unknown one fails, naming the choices."""
    unknown = [group for group in voters if group not in VOTERS]
    if unknown or not voters:
        raise LoraflowError(
            f"--voters {', '.join(unknown) or '(none)'}: give human, ai or all (repeat for more boards)."
        )
    return tuple(dict.fromkeys(voters))


@dataclass(frozen=True)
class GateSettings:
    """The statistical gate's test (loraflow.arena.gate): a Bradley-Terry win probability's interval against 0.5."""

    level: float = field(default=0.95, metadata={"help": "Confidence level of the win-probability interval."})
    threshold: float = field(
        default=0.5,
        metadata={
            "help": "Promote when the interval's lower bound is above this; roll back when its upper bound is below."
        },
    )
    min_votes: int = field(default=10, metadata={"help": "Head-to-head votes before the gate may decide."})
    max_votes: int = field(
        default=100, metadata={"help": "Head-to-head votes after which a candidate not shown better is rejected."}
    )

    def __post_init__(self) -> None:
        if not 0 < self.level < 1:
            raise LoraflowError(f"gate level is {self.level}; give a confidence level between 0 and 1, e.g. 0.95.")
        if not 0 < self.threshold < 1:
            raise LoraflowError(f"gate threshold is {self.threshold}; give a win probability between 0 and 1.")
        if not 1 <= self.min_votes <= self.max_votes:
            raise LoraflowError(
                f"gate votes: min {self.min_votes}, max {self.max_votes}; need 1 <= min_votes <= max_votes."
            )


DEFAULT_SERVER = "http://127.0.0.1:8000"  # where `loraflow serve` listens by default
NO_API_KEY = "EMPTY"  # what the openai client sends to a server started without --api-key


@dataclass
class ArenaSettings:
    names: list[str]
    server_url: str
    api_key: str = NO_API_KEY
    include_base: bool = field(default=True, metadata={"help": "Let the base model compete as 'base'."})
    max_versions: int = 4
    on_policy_share: float = field(
        default=0.5,
        metadata={"help": "Share of rounds that show two samples of the live version: the votes that move it most."},
    )
    gate: GateSettings = field(default_factory=GateSettings)
    hygiene: HygieneSettings | None = field(
        default_factory=HygieneSettings, metadata={"help": "Which votes count for the ratings; None counts every vote."}
    )
    max_tokens: int = field(default=96, metadata={"help": "Longest answer in tokens."})
    temperature: float = 0.8
    base_model: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.on_policy_share <= 1:
            raise LoraflowError(f"on_policy_share is {self.on_policy_share}; give a share between 0 and 1.")


@dataclass
class LoopSettings:
    name: str
    votes_needed: int = field(
        default=100, metadata={"help": "New decisive votes on the live version that start a retrain."}
    )
    gate: GateSettings | None = field(
        default_factory=GateSettings,
        metadata={
            "help": "Promote a new version only once its head-to-head votes show it beats its parent; without a "
            "gate it goes live right after training. Either way a live version shown worse is rolled back."
        },
    )
    base: str = field(default=DEFAULT_BASE, metadata={"help": "The base model the adapter was trained on."})
    hygiene: HygieneSettings | None = field(
        default_factory=HygieneSettings,
        metadata={"help": "Leave out the votes vote hygiene excludes; None trains on every vote."},
    )
    balance_lengths: bool = field(
        default=False,
        metadata={
            "help": "Leave out votes so that as many winners are the longer answer as the shorter one: the next "
            "version then learns no length preference from voters who favour long (or short) answers."
        },
    )
    trainer: str = field(
        default="dpo",
        metadata={
            "help": "The trainer the votes go to: dpo (pairs), kto (each answer good or bad: learns from ties and "
            "both-bad votes too), ppo (a reward model from the pairs, then PPO), or an installed plugin's."
        },
    )
    training_overrides: dict = field(default_factory=dict)
    poll_s: float = field(default=5.0, metadata={"help": "Seconds between looks at the vote store."})
    backoff_s: float = field(
        default=60.0, metadata={"help": "Seconds to wait after a failed training; doubled after each further failure."}
    )
    max_backoff_s: float = field(default=3600.0, metadata={"help": "The longest wait between two training attempts."})

    def __post_init__(self) -> None:
        if self.votes_needed < 1:
            raise LoraflowError(f"votes_needed is {self.votes_needed}; it must be at least 1.")
        if self.backoff_s < 0 or self.max_backoff_s < self.backoff_s:
            raise LoraflowError(
                f"backoff_s {self.backoff_s} and max_backoff_s {self.max_backoff_s}: "
                "need 0 <= backoff_s <= max_backoff_s."
            )


# What the loop trains with unless --set says otherwise: one pass at the trainer's own defaults barely moved the
# adapter; three passes at LoRA's usual step size did, on both shipped tasks (bench/loop_quality.py, README).
LOOP_TRAINING = {"dpo": {"learning_rate": 2e-4, "num_train_epochs": 3.0}}


def trainer_config(trainer: str, overrides: dict):
    """The trainer's config with the loop's defaults for it and the --set values over them, built at start so a
    typo fails before the loop waits for votes."""
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
    config = load_config(config_class, None, {**LOOP_TRAINING.get(trainer, {}), **overrides})
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
