"""The gate's verdicts from head-to-head tallies: the candidate's and the live version's tests agree with the arena's
pairing, so the arena pairs two versions exactly as long as their votes can still decide something."""

from __future__ import annotations

import pytest

from loraflow.arena.gate import KEEP, PROMOTE, REJECT, ROLLBACK, UNDECIDED, judge_candidate, needs_votes, watch_live
from loraflow.arena.settings import GateSettings
from loraflow.arena.votes import HeadToHead

GATE = GateSettings(min_votes=10, max_votes=30)


@pytest.mark.parametrize(
    "wins, losses, draws, candidate, live",
    [
        (9, 0, 0, UNDECIDED, UNDECIDED),  # clear, but below the minimum: neither decides yet
        (9, 1, 0, PROMOTE, KEEP),
        (7, 3, 0, UNDECIDED, UNDECIDED),
        (0, 10, 0, REJECT, ROLLBACK),
        (12, 12, 6, REJECT, KEEP),  # the budget is spent without the candidate shown better
    ],
)
def test_verdicts_and_the_arenas_pairing_agree(wins, losses, draws, candidate, live):
    tally = HeadToHead("x@2", "x@1", wins, losses, draws)
    assert judge_candidate(tally, GATE).action == candidate
    assert watch_live(tally, GATE).action == live
    assert needs_votes(tally, GATE) == (candidate == UNDECIDED)
