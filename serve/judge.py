"""A rule-based judge and a simulated voter for the pirate task: an answer that opens with "Arr" is better.

The voter plays rounds through `Arena.play` and `Arena.vote`, the same calls the Gradio buttons make.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

from serve.rounds import Arena


def is_pirate(answer: str) -> bool:
    return answer.lstrip().lower().startswith("arr")


def judge(answer_a: str, answer_b: str) -> str:
    """'a' or 'b' when exactly one answer opens with Arr, 'both_bad' when neither does, 'tie' when both do."""
    a, b = is_pirate(answer_a), is_pirate(answer_b)
    if a != b:
        return "a" if a else "b"
    return "tie" if a else "both_bad"


@dataclass(frozen=True)
class VoterReport:
    rounds: int
    created: int
    outcomes: dict[str, int]


def simulate_votes(arena: Arena, prompts: Sequence[str], rounds: int, seed: int = 0, parallel: int = 4, session_id: str = "simulated-voter") -> VoterReport:
    """Play `rounds` rounds on prompts drawn from `prompts`, several at once, and vote on each as the judge says."""
    rng = random.Random(seed)
    plan = [(index, rng.choice(prompts), random.Random(rng.random())) for index in range(rounds)]

    def one(item):
        index, prompt, round_rng = item
        played = arena.play(prompt, round_rng)
        outcome = judge(*played.answers)
        # One simulated visitor per round, as many people voting would be; the per-session limit still applies.
        return arena.vote(played, outcome, f"{session_id}-{index}"), outcome

    outcomes: dict[str, int] = {}
    created = 0
    with ThreadPoolExecutor(parallel) as pool:
        for recorded, outcome in pool.map(one, plan):
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            created += recorded.created_now
    return VoterReport(rounds, created, outcomes)
