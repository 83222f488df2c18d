"""Which two contestants answer the next prompt.

A version that has just been published is paired with its parent until the two have `focus_votes`
head-to-head votes, so the loop's promotion gate gets its evidence quickly. Otherwise contestants with few
votes are drawn more often, and the opponent is drawn with a weight that favours close ratings.
Sides are always shuffled.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

from loraflow.arena.votes import Vote


@dataclass(frozen=True)
class Pairing:
    """The contestants shown as answer A and answer B."""

    a: str
    b: str


def head_to_head(votes: Sequence[Vote], first: str, second: str) -> list[Vote]:
    return [v for v in votes if {v.contestant_a, v.contestant_b} == {first, second}]


def choose_pair(
    contestants: Sequence[str],
    votes: Sequence[Vote],
    ratings: dict[str, float],
    rng: random.Random,
    focus: tuple[str, str] | None = None,
    focus_votes: int = 20,
    closeness: float = 200.0,
) -> Pairing:
    """Two different contestants, in random order. `focus` is (new version, its parent)."""
    pool = list(dict.fromkeys(contestants))
    if len(pool) < 2:
        raise ValueError(f"the arena needs at least two contestants, it has {pool}.")
    if focus and all(c in pool for c in focus) and len(head_to_head(votes, *focus)) < focus_votes:
        first, second = focus
    else:
        counts = {c: 0 for c in pool}
        for vote in votes:
            for contestant in (vote.contestant_a, vote.contestant_b):
                if contestant in counts:
                    counts[contestant] += 1
        first = rng.choices(pool, weights=[1.0 / math.sqrt(1 + counts[c]) for c in pool])[0]
        others = [c for c in pool if c != first]
        mean = sum(ratings.values()) / len(ratings) if ratings else 0.0
        own = ratings.get(first, mean)
        closeness_weights = [math.exp(-abs(ratings.get(c, mean) - own) / closeness) for c in others]
        second = rng.choices(others, weights=closeness_weights)[0]
    if rng.random() < 0.5:
        first, second = second, first
    return Pairing(first, second)
