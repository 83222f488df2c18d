"""A rule-based judge and a simulated voter for the pirate task: an answer that opens with "Arr" is better.

The voter plays rounds through `Arena.play` and `Arena.vote`, the same calls the Gradio buttons make.
"""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from loraflow.arena.rounds import Arena


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


def simulate_votes(
    arena: Arena,
    prompts: Sequence[str],
    rounds: int,
    seed: int = 0,
    parallel: int = 4,
    session_id: str = "simulated-voter",
) -> VoterReport:
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


def prompts_from(path: Path) -> list[str]:
    """The user prompts of a messages or preference JSONL file (data/pirate/heldout.jsonl, say)."""
    prompts = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if "prompt" in record:
                prompts.append(record["prompt"])
            else:
                prompts.append(next(m["content"] for m in record["messages"] if m["role"] == "user"))
    return prompts


@dataclass(frozen=True)
class Comparison:
    """Greedy answers of two models on the same prompts, scored by the judge."""

    model_a: str
    model_b: str
    prompts: int
    pirate_a: int
    pirate_b: int
    wins_a: int
    wins_b: int

    @property
    def win_rate_b(self) -> float:
        """B's share of the prompts where the judge could tell the two apart."""
        decisive = self.wins_a + self.wins_b
        return self.wins_b / decisive if decisive else 0.5


def compare(client, model_a: str, model_b: str, prompts: Sequence[str], max_tokens: int = 24) -> Comparison:
    """Ask both models every prompt (temperature 0) through the serving endpoint and count the judge's verdicts."""

    def answer(model: str, prompt: str) -> str:
        response = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0
        )
        return response.choices[0].message.content or ""

    with ThreadPoolExecutor(8) as pool:
        answers_a = list(pool.map(lambda prompt: answer(model_a, prompt), prompts))
        answers_b = list(pool.map(lambda prompt: answer(model_b, prompt), prompts))
    verdicts = [judge(a, b) for a, b in zip(answers_a, answers_b)]
    return Comparison(
        model_a=model_a,
        model_b=model_b,
        prompts=len(prompts),
        pirate_a=sum(map(is_pirate, answers_a)),
        pirate_b=sum(map(is_pirate, answers_b)),
        wins_a=verdicts.count("a"),
        wins_b=verdicts.count("b"),
    )
