"""Which two contestants answer the next prompt, when the arena has no round it needs more (see `Arena.pairing`).

Contestants with few votes are drawn more often, and the opponent is drawn with a weight that favours close
ratings, whose outcome is the least certain. Sides are always shuffled.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Mapping, Sequence


@dataclass(frozen=True)
class Pairing:
    """The contestants shown as answer A and answer B."""

    a: str
    b: str


def choose_pair(
    contestants: Sequence[str],
    counts: Mapping[str, int],
    ratings: Mapping[str, float],
    rng: random.Random,
    closeness: float = 200.0,
) -> Pairing:
    """Two different contestants, in random order: the first drawn favouring those with few votes (`counts`), the
    second favouring ratings close to the first's."""
    pool = list(dict.fromkeys(contestants))
    if len(pool) < 2:
        raise ValueError(f"the arena needs at least two contestants, it has {pool}.")
    first = rng.choices(pool, weights=[1.0 / math.sqrt(1 + counts.get(c, 0)) for c in pool])[0]
    others = [c for c in pool if c != first]
    mean = sum(ratings.values()) / len(ratings) if ratings else 0.0
    own = ratings.get(first, mean)
    second = rng.choices(others, weights=[math.exp(-abs(ratings.get(c, mean) - own) / closeness) for c in others])[0]
    return shuffled(first, second, rng)


def shuffled(first: str, second: str, rng: random.Random) -> Pairing:
    return Pairing(first, second) if rng.random() < 0.5 else Pairing(second, first)
