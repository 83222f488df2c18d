"""The statistical gate: whether a version beats its parent, from their head-to-head votes.

A candidate is promoted once the lower bound of its Bradley-Terry win probability over its parent (a 95%
interval by default) clears `threshold`, and rejected once the upper bound falls below it, or when `max_votes`
head-to-head votes have not shown it better. After a promotion the same test keeps watching: a live version
whose upper bound falls below `threshold` against its parent is rolled back. Between `min_votes` and a
verdict the arena keeps pairing the two, so the votes go where they decide something.
"""

from __future__ import annotations

from dataclasses import dataclass

from loraflow.arena.ratings import WinProbability, win_probability
from loraflow.arena.settings import GateSettings
from loraflow.arena.votes import HeadToHead

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


def judge_candidate(tally: HeadToHead, settings: GateSettings) -> Verdict:
    """`tally` counts the candidate's votes against its parent, from the candidate's side."""
    estimate = win_probability(tally, settings.level)
    if estimate.games < settings.min_votes:
        return Verdict(UNDECIDED, estimate)
    if estimate.low > settings.threshold:
        return Verdict(PROMOTE, estimate)
    if estimate.high < settings.threshold or estimate.games >= settings.max_votes:
        return Verdict(REJECT, estimate)
    return Verdict(UNDECIDED, estimate)


def watch_live(tally: HeadToHead, settings: GateSettings) -> Verdict:
    """After a promotion: roll back once the live version is shown worse than its parent (`tally` from its side)."""
    estimate = win_probability(tally, settings.level)
    if estimate.games < settings.min_votes:
        return Verdict(UNDECIDED, estimate)
    if estimate.high < settings.threshold:
        return Verdict(ROLLBACK, estimate)
    if estimate.low > settings.threshold or estimate.games >= settings.max_votes:
        return Verdict(KEEP, estimate)
    return Verdict(UNDECIDED, estimate)


def needs_votes(tally: HeadToHead, settings: GateSettings) -> bool:
    """Whether more votes between a version and its parent would still decide something (`tally` from its side)."""
    return watch_live(tally, settings).action == UNDECIDED
