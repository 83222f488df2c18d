"""Which votes a trainer can learn from. A vote it cannot (an empty or repeated answer, or a pair longer than the
trainer's max_length) is set aside with its reason, so one bad vote never fails a whole training.

The checks are the ones `hub.data` applies to a preference file, so nothing that passes here is refused later.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from loraflow.arena.export import training_records
from loraflow.arena.votes import Vote
from loraflow.hub.data import CHECKS, DataError, check_lengths


@dataclass(frozen=True)
class SetAside:
    vote_id: str
    seq: int
    reason: str


def unusable_because(vote: Vote, tokenizer, max_length: int, data_format: str = "preference") -> str | None:
    """Why a vote cannot be trained on as `data_format` data, or None when it can."""
    for record in training_records([vote], data_format):
        problem = CHECKS[data_format](record)
        if problem:
            return problem
        try:
            check_lengths([{**record, "_line": vote.seq}], Path("votes"), tokenizer, max_length, data_format)
        except DataError as error:
            return error.problems[0].message
    return None


def screen_votes(
    votes: Sequence[Vote], tokenizer, max_length: int, data_format: str = "preference"
) -> tuple[list[Vote], list[SetAside]]:
    """The votes to train on, and the ones set aside with their reasons."""
    kept, aside = [], []
    for vote in votes:
        reason = unusable_because(vote, tokenizer, max_length, data_format)
        if reason is None:
            kept.append(vote)
        else:
            aside.append(SetAside(vote.vote_id, vote.seq, reason))
    return kept, aside
