"""The statistical gate: whether a version beats its parent, from their head-to-head votes.

A candidate is promoted once the lower bound of its Bradley-Terry win probability over its parent (a 95%
interval by default) clears `threshold`, and rejected once the upper bound falls below it, or when `max_votes`
head-to-head votes have not shown it better. After a promotion the same test keeps watching: a live version
whose upper bound falls below `threshold` against its parent is rolled back. Between `min_votes` and a
verdict the arena keeps pairing the two, so the votes go where they decide something.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from loraflow.arena.ratings import WinProbability, win_probability
from loraflow.arena.settings import GateSettings
from loraflow.arena.votes import Vote

PROMOTE, REJECT, ROLLBACK, UNDECIDED, KEEP = "promote", "reject", "rollback", "undecided", "keep"


@dataclass(frozen=True)
class Verdict:
    action: str  # PROMOTE, REJECT or UNDECIDED for a candidate; ROLLBACK, KEEP or UNDECIDED for a live version
    estimate: WinProbability

    @property
    def reason(self) -> str:
        e = self.estimate
        share = f"{e.level:.0%}"
        return (
            f"P({e.first} beats {e.second}) = {e.probability:.2f}, {share} interval {e.low:.2f}-{e.high:.2f}, "
            f"from {e.games} head-to-head votes"
        )


def head_to_head(votes: Sequence[Vote], first: str, second: str) -> list[Vote]:
    return [v for v in votes if {v.contestant_a, v.contestant_b} == {first, second}]


def judge_candidate(votes: Sequence[Vote], candidate: str, parent: str, settings: GateSettings) -> Verdict:
    estimate = win_probability(head_to_head(votes, candidate, parent), candidate, parent, settings.level)
    if estimate.games < settings.min_votes:
        return Verdict(UNDECIDED, estimate)
    if estimate.low > settings.threshold:
        return Verdict(PROMOTE, estimate)
    if estimate.high < settings.threshold or estimate.games >= settings.max_votes:
        return Verdict(REJECT, estimate)
    return Verdict(UNDECIDED, estimate)


def watch_live(votes: Sequence[Vote], live: str, parent: str, settings: GateSettings) -> Verdict:
    """After a promotion: roll back once the live version is shown worse than its parent."""
    estimate = win_probability(head_to_head(votes, live, parent), live, parent, settings.level)
    if estimate.games >= settings.min_votes and estimate.high < settings.threshold:
        return Verdict(ROLLBACK, estimate)
    if estimate.games >= settings.max_votes or estimate.low > settings.threshold:
        return Verdict(KEEP, estimate)
    return Verdict(UNDECIDED, estimate)


def needs_votes(votes: Sequence[Vote], newer: str, parent: str, settings: GateSettings) -> bool:
    """Whether head-to-head votes between a version and its parent would still decide something."""
    return watch_live(votes, newer, parent, settings).action == UNDECIDED
