"""Votes to training data, in one of TRL's two preference formats (export_training_data picks by name).

preference (prompt/chosen/rejected, for dpo and ppo): a vote for A or B becomes one pair. Ties say nothing about
which answer is better: they are counted and left out. Both-bad votes are written to a separate file, so they can
be used later (as negatives, or to collect better answers) without polluting the pairs.

unpaired (prompt/completion/label, for kto): every vote becomes two records, one per answer, each labelled
desirable (true) or not (false). A or B: the winner's answer true, the loser's false; tie: both true; both_bad:
both false. So ties and both-bad votes teach too, as Chatbot Arena's buttons tell "tie" from "both are bad".
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from loraflow.arena.votes import DECISIVE, Vote, VoteStore
from loraflow.hub.errors import LoraflowError

EXPORT_FORMATS = ("preference", "unpaired")
# Each outcome's labels for (answer A, answer B) in unpaired data: true is a desirable answer.
ANSWER_LABELS = {"a": (True, False), "b": (False, True), "tie": (True, True), "both_bad": (False, False)}


@dataclass(frozen=True)
class ExportReport:
    """What an export wrote: `pairs`, `ties` and `both_bad` count votes of each kind. For preference data the pairs
    are the file's lines; for unpaired data every vote gave two lines, `desirable` + `undesirable` of them.
    first_seq/last_seq span the votes the file holds."""

    pairs: int
    ties: int
    both_bad: int
    first_seq: int | None
    last_seq: int | None
    out: Path
    both_bad_out: Path | None
    data_format: str = "preference"
    desirable: int = 0
    undesirable: int = 0

    @property
    def examples(self) -> int:
        """The training examples written to `out`."""
        return self.pairs if self.data_format == "preference" else self.desirable + self.undesirable


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


def unpaired_feedback(votes: Sequence[Vote]) -> list[dict]:
    """Two TRL unpaired records per vote, answer A's then answer B's, labelled by ANSWER_LABELS, with the
    contestant that gave the answer."""
    records = []
    for vote in votes:
        label_a, label_b = ANSWER_LABELS[vote.outcome]
        for answer, model, label in (
            (vote.answer_a, vote.contestant_a, label_a),
            (vote.answer_b, vote.contestant_b, label_b),
        ):
            records.append(
                {
                    "prompt": vote.prompt,
                    "completion": answer,
                    "label": label,
                    "model": model,
                    "vote_id": vote.vote_id,
                    "seq": vote.seq,
                }
            )
    return records


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


def export_unpaired(votes: Sequence[Vote], out: str | Path) -> ExportReport:
    out = Path(out)
    records = unpaired_feedback(votes)
    _write_jsonl(records, out)
    desirable = sum(record["label"] for record in records)
    outcomes = [vote.outcome for vote in votes]
    return ExportReport(
        pairs=sum(outcome in DECISIVE for outcome in outcomes),
        ties=outcomes.count("tie"),
        both_bad=outcomes.count("both_bad"),
        first_seq=min((vote.seq for vote in votes), default=None),
        last_seq=max((vote.seq for vote in votes), default=None),
        out=out,
        both_bad_out=None,
        data_format="unpaired",
        desirable=desirable,
        undesirable=len(records) - desirable,
    )


def winner_is_longer(vote: Vote) -> bool | None:
    """Whether a decisive vote's winning answer has more words than the losing one; None for equal lengths."""
    winner, loser = (vote.answer_a, vote.answer_b) if vote.outcome == "a" else (vote.answer_b, vote.answer_a)
    difference = len(winner.split()) - len(loser.split())
    return None if difference == 0 else difference > 0


def balance_lengths(votes: Sequence[Vote], seed: int = 0) -> tuple[list[Vote], list[Vote]]:
    """Length de-biasing: decisive votes whose winner is the longer answer, as many as those whose winner is the
    shorter one, by leaving out a random sample of the larger group. Voters who favour length then teach no
    length preference, only what else the winners have. Returns the votes kept (in order) and those left out."""
    decisive = [v for v in votes if v.outcome in DECISIVE]
    longer = [v for v in decisive if winner_is_longer(v) is True]
    shorter = [v for v in decisive if winner_is_longer(v) is False]
    larger, smaller = (longer, shorter) if len(longer) > len(shorter) else (shorter, longer)
    dropped = {v.vote_id for v in random.Random(seed).sample(larger, len(larger) - len(smaller))}
    return [v for v in votes if v.vote_id not in dropped], [v for v in votes if v.vote_id in dropped]


def training_records(votes: Sequence[Vote], data_format: str) -> list[dict]:
    """The records `export_training_data` would write for these votes, in memory."""
    check_export_format(data_format)
    return preference_pairs(votes) if data_format == "preference" else unpaired_feedback(votes)


def check_export_format(data_format: str) -> None:
    if data_format not in EXPORT_FORMATS:
        raise LoraflowError(
            f"votes cannot be exported as {data_format!r} data; the formats are {', '.join(EXPORT_FORMATS)} "
            "(preference for dpo and ppo, unpaired for kto)."
        )


def export_training_data(votes: Sequence[Vote], out: str | Path, data_format: str) -> ExportReport:
    """Votes as the training data a trainer of `data_format` reads: preference pairs or unpaired records."""
    check_export_format(data_format)
    export = export_preferences if data_format == "preference" else export_unpaired
    return export(votes, out)


def votes_of(store: VoteStore, name: str, after_seq: int = 0) -> list[Vote]:
    """The votes on any version of `name`; a name nobody voted on is refused, naming those with votes."""
    voted = store.adapter_names()
    if name not in voted:
        raise LoraflowError(
            f"no votes on adapter {name!r} in {store.location}; adapters with votes: {', '.join(voted) or 'none yet'}. "
            "Check the name, or --votes."
        )
    return store.votes(name=name, after_seq=after_seq)


def export_votes_of(
    store: VoteStore,
    name: str,
    out: str | Path,
    after_seq: int = 0,
    data_format: str = "preference",
    lengths_balanced: bool = False,
) -> ExportReport:
    """The votes on any version of `name` as `data_format` data, length-balanced if asked (see balance_lengths); a
    name nobody voted on, or an unknown format, is refused before writing."""
    check_export_format(data_format)
    votes = votes_of(store, name, after_seq)
    if lengths_balanced:
        votes, _ = balance_lengths(votes)
    return export_training_data(votes, out, data_format)
