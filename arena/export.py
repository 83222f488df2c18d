"""Votes to a preference dataset in TRL's prompt/chosen/rejected format.

A vote for A or B becomes one pair. Ties say nothing about which answer is better: they are counted and
left out. Both-bad votes are written to a separate file, so they can be used later (as negatives, or to
collect better answers) without polluting the pairs.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from loraflow.arena.votes import DECISIVE, Vote, VoteStore
from loraflow.hub.errors import LoraflowError


@dataclass(frozen=True)
class ExportReport:
    pairs: int
    ties: int
    both_bad: int
    first_seq: int | None
    last_seq: int | None
    out: Path
    both_bad_out: Path | None


@dataclass(frozen=True)
class PreferenceData:
    """Votes as training wants them: the pairs, the both-bad votes kept aside, and how many ties were left out.
    first_seq/last_seq span the decisive votes (the pairs)."""

    pairs: list[dict]
    both_bad: list[dict]
    ties: int
    first_seq: int | None
    last_seq: int | None


def preference_pairs(votes: Sequence[Vote]) -> list[dict]:
    """One TRL pair per A/B vote, with the contestant that answered each side."""
    pairs = []
    for vote in votes:
        if vote.outcome not in DECISIVE:
            continue
        chosen, rejected = (vote.answer_a, vote.answer_b) if vote.outcome == "a" else (vote.answer_b, vote.answer_a)
        pairs.append(
            {
                "prompt": vote.prompt,
                "chosen": chosen,
                "rejected": rejected,
                "chosen_model": vote.winner,
                "rejected_model": vote.loser,
                "vote_id": vote.vote_id,
                "seq": vote.seq,
            }
        )
    return pairs


def preference_data(votes: Sequence[Vote]) -> PreferenceData:
    """Split votes into pairs, both-bad votes and a count of ties, in memory (export_preferences writes them)."""
    both_bad = [
        {
            "prompt": v.prompt,
            "answers": [v.answer_a, v.answer_b],
            "contestants": [v.contestant_a, v.contestant_b],
            "vote_id": v.vote_id,
            "seq": v.seq,
        }
        for v in votes
        if v.outcome == "both_bad"
    ]
    decisive = [v.seq for v in votes if v.outcome in DECISIVE]
    return PreferenceData(
        pairs=preference_pairs(votes),
        both_bad=both_bad,
        ties=sum(v.outcome == "tie" for v in votes),
        first_seq=min(decisive, default=None),
        last_seq=max(decisive, default=None),
    )


def _write_jsonl(records: list[dict], path: Path) -> None:
    """Write beside the target and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(descriptor, "w") as stream:
        for record in records:
            stream.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(temporary, path)


def both_bad_path(out: Path) -> Path:
    return out.with_name(out.stem + ".both_bad.jsonl")


def export_preferences(votes: Sequence[Vote], out: str | Path) -> ExportReport:
    out = Path(out)
    data = preference_data(votes)
    _write_jsonl(data.pairs, out)
    bad_out = both_bad_path(out) if data.both_bad else None
    if bad_out:
        _write_jsonl(data.both_bad, bad_out)
    return ExportReport(
        pairs=len(data.pairs),
        ties=data.ties,
        both_bad=len(data.both_bad),
        first_seq=data.first_seq,
        last_seq=data.last_seq,
        out=out,
        both_bad_out=bad_out,
    )


def votes_of(store: VoteStore, name: str, after_seq: int = 0) -> list[Vote]:
    """The votes on any version of `name`; a name nobody voted on is refused, naming those with votes."""
    voted = store.adapter_names()
    if name not in voted:
        raise LoraflowError(
            f"no votes on adapter {name!r} in {store.location}; adapters with votes: {', '.join(voted) or 'none yet'}. "
            "Check the name, or --votes."
        )
    return store.votes(name=name, after_seq=after_seq)


def export_votes_of(store: VoteStore, name: str, out: str | Path, after_seq: int = 0) -> ExportReport:
    """The votes on any version of `name` as preference data; a name nobody voted on is refused before writing."""
    return export_preferences(votes_of(store, name, after_seq), out)
