"""Judges, the simulated voter that votes with one, and `compare`, which scores two served models with one.

A judge is a plugin (the `register_judges` hook). Built in: two rule-based judges below, `pirate` (an answer
that opens with "Arr" is better) and `concise` (the clearly shorter answer is better), one for each shipped
task, and `llm` (loraflow.arena.llm_judge), which asks a served model. The voter plays rounds through
`Arena.play` and `Arena.vote`, the same calls the Gradio buttons make, under session ids `judge-NAME-...`,
so a judge's votes can always be told apart from a person's.
"""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Protocol, Sequence

from loraflow.arena.settings import DEFAULT_SERVER, NO_API_KEY
from loraflow.hub.errors import LoraflowError
from loraflow.hub.hookspecs import hookimpl

if TYPE_CHECKING:
    from loraflow.arena.rounds import Arena

DEFAULT_JUDGE = "pirate"
JUDGE_SESSION_PREFIX = "judge-"


def is_pirate(answer: str) -> bool:
    return answer.lstrip().lower().startswith("arr")


def pirate_rule(answer_a: str, answer_b: str) -> str:
    """'a' or 'b' when exactly one answer opens with Arr, 'both_bad' when neither does, 'tie' when both do."""
    a, b = is_pirate(answer_a), is_pirate(answer_b)
    if a != b:
        return "a" if a else "b"
    return "tie" if a else "both_bad"


@dataclass(frozen=True)
class JudgeSettings:
    """What a judge may need: the model it asks and where that model is served (the rule-based judges ignore it)."""

    server_url: str = DEFAULT_SERVER
    api_key: str = NO_API_KEY
    model: Optional[str] = None


class Judge(Protocol):
    name: str
    description: str

    def judge(self, prompt: str, answer_a: str, answer_b: str) -> str: ...


class PirateJudge:
    name = "pirate"
    description = 'Rule-based: an answer that opens with "Arr" beats one that does not; neither is both_bad.'

    def __init__(self, settings: JudgeSettings | None = None):
        pass

    def judge(self, prompt: str, answer_a: str, answer_b: str) -> str:
        return pirate_rule(answer_a, answer_b)


CLEARLY_SHORTER = 0.8  # an answer shorter than this share of the other's length is clearly shorter


def concise_rule(answer_a: str, answer_b: str) -> str:
    """The clearly shorter of two non-empty answers wins, in words; an empty answer loses; close lengths tie."""
    a, b = len(answer_a.split()), len(answer_b.split())
    if not a or not b:
        return "both_bad" if a == b else ("a" if a else "b")
    if min(a, b) >= CLEARLY_SHORTER * max(a, b):
        return "tie"
    return "a" if a < b else "b"


class ConciseJudge:
    name = "concise"
    description = "Rule-based: the clearly shorter answer wins (under 80% of the other's words); an empty one loses."

    def __init__(self, settings: JudgeSettings | None = None):
        pass

    def judge(self, prompt: str, answer_a: str, answer_b: str) -> str:
        return concise_rule(answer_a, answer_b)


def load_judge(name: str = DEFAULT_JUDGE, settings: JudgeSettings | None = None) -> Judge:
    """The installed judge called `name`, built with `settings`; an unknown name fails naming the installed ones."""
    from loraflow.hub.plugins import get_plugins

    return get_plugins().judge(name).judge_class(settings or JudgeSettings())


def verdict(judge: Judge, prompt: str, answer_a: str, answer_b: str) -> str:
    """The judge's outcome, checked: a plugin that answers anything but a vote outcome is named in the error."""
    from loraflow.arena.votes import OUTCOMES

    outcome = judge.judge(prompt, answer_a, answer_b)
    if outcome not in OUTCOMES:
        raise LoraflowError(f"judge {judge.name!r} returned {outcome!r}; a judge returns one of {', '.join(OUTCOMES)}.")
    return outcome


def judge_session(judge_name: str, *parts: object) -> str:
    """The session id a judge votes under: `judge-NAME-...`, so AI and human votes can be kept apart."""
    return "-".join([f"{JUDGE_SESSION_PREFIX}{judge_name}", *map(str, parts)])


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
    session_id: str | None = None,
    judge: Judge | None = None,
) -> VoterReport:
    """Play `rounds` rounds on prompts drawn from `prompts`, several at once, and vote on each as `judge` says
    (the pirate judge by default), under session ids `session_id-INDEX` (default `judge-NAME`)."""
    judge = judge or PirateJudge()
    session_id = session_id or judge_session(judge.name)
    rng = random.Random(seed)
    plan = [(index, rng.choice(prompts), random.Random(rng.random())) for index in range(rounds)]

    def one(item):
        index, prompt, round_rng = item
        played = arena.play(prompt, round_rng)
        outcome = verdict(judge, played.prompt, *played.answers)
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
    judge: str = DEFAULT_JUDGE
    words_a: float = 0.0  # mean words per answer, which a length-biased voter would reward
    words_b: float = 0.0

    @property
    def win_rate_b(self) -> float:
        """B's share of the prompts where the judge could tell the two apart."""
        decisive = self.wins_a + self.wins_b
        return self.wins_b / decisive if decisive else 0.5


def compare(
    client, model_a: str, model_b: str, prompts: Sequence[str], max_tokens: int = 96, judge: Judge | None = None
) -> Comparison:
    """Ask both models every prompt (temperature 0) through the serving endpoint and count `judge`'s verdicts
    (the pirate judge by default)."""
    judge = judge or PirateJudge()

    def answer(model: str, prompt: str) -> str:
        response = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0
        )
        return response.choices[0].message.content or ""

    with ThreadPoolExecutor(8) as pool:
        answers_a = list(pool.map(lambda prompt: answer(model_a, prompt), prompts))
        answers_b = list(pool.map(lambda prompt: answer(model_b, prompt), prompts))
        verdicts = list(pool.map(lambda item: verdict(judge, *item), zip(prompts, answers_a, answers_b)))
    return Comparison(
        model_a=model_a,
        model_b=model_b,
        prompts=len(prompts),
        pirate_a=sum(map(is_pirate, answers_a)),
        pirate_b=sum(map(is_pirate, answers_b)),
        wins_a=verdicts.count("a"),
        wins_b=verdicts.count("b"),
        judge=judge.name,
        words_a=sum(len(answer.split()) for answer in answers_a) / max(len(prompts), 1),
        words_b=sum(len(answer.split()) for answer in answers_b) / max(len(prompts), 1),
    )


@hookimpl
def register_judges(register) -> None:
    register(PirateJudge)
    register(ConciseJudge)
