"""The `llm` judge: a model served by name through the OpenAI-compatible endpoint says which answer is better.

Models favour whichever answer they read first, so every pair is asked twice, the second time with the
answers swapped. A verdict of "a" or "b" (or "both_bad") stands only when both orders agree; any
disagreement, or a reply that names no verdict, is a "tie".
"""

from __future__ import annotations

import re

from loraflow.arena.judge import JudgeSettings
from loraflow.hub.errors import LoraflowError
from loraflow.hub.hookspecs import hookimpl

SYSTEM_PROMPT = (
    "You are an impartial judge. You compare two answers to the same user prompt and decide which one answers "
    "it better: more helpful, correct and following the prompt. Reply with exactly one word: A if answer A is "
    "better, B if answer B is better, TIE if they are equally good, BAD if both are bad."
)
USER_TEMPLATE = (
    "[User prompt]\n{prompt}\n[End of user prompt]\n\n"
    "[Answer A]\n{answer_a}\n[End of answer A]\n\n"
    "[Answer B]\n{answer_b}\n[End of answer B]\n\n"
    "Which answer is better? Reply with one word: A, B, TIE or BAD."
)
VERDICT_WORDS = {"a": "a", "b": "b", "tie": "tie", "equal": "tie", "bad": "both_bad", "neither": "both_bad"}
FILLER_WORDS = {"answer", "verdict", "final", "the", "is", "better", "response", "option", "winner", "assistant"}
SWAPPED = {"a": "b", "b": "a", "tie": "tie", "both_bad": "both_bad", None: None}
VERDICT_MAX_TOKENS = 4


def parse_verdict(reply: str) -> str | None:
    """The outcome a judge model's reply names ("A", "**B**", "Answer: A", "[[TIE]]", "both bad"), None if it names
    none; only the first meaningful word counts, so "A is better than B" is "a"."""
    words = [word for word in re.findall(r"[a-z]+", reply.lower()) if word not in FILLER_WORDS]
    if words[:2] == ["both", "bad"]:
        return "both_bad"
    return VERDICT_WORDS.get(words[0]) if words else None


def combine(first: str | None, swapped_back: str | None) -> str:
    """The verdict both orders agree on; "tie" when they disagree or either named none."""
    return first if first is not None and first == swapped_back else "tie"


class LlmJudge:
    name = "llm"
    description = "Asks a served model (--judge-model) which answer is better, in both orders; disagreement is a tie."

    def __init__(self, settings: JudgeSettings | None = None):
        from openai import OpenAI

        settings = settings or JudgeSettings()
        if not settings.model:
            raise LoraflowError(
                "the llm judge needs a model to ask: pass --judge-model NAME (or set LORAFLOW_JUDGE_MODEL), "
                "a name the server at --judge-server serves."
            )
        self.settings = settings
        self.client = OpenAI(
            base_url=settings.server_url.rstrip("/") + "/v1", api_key=settings.api_key, max_retries=1, timeout=120
        )
        # One one-token request now, so an unreachable server or an unknown model fails before any round is played.
        self._complete([{"role": "user", "content": "Reply with OK."}], max_tokens=1)

    def judge(self, prompt: str, answer_a: str, answer_b: str) -> str:
        first = self.ask(prompt, answer_a, answer_b)
        swapped_back = SWAPPED[self.ask(prompt, answer_b, answer_a)]
        return combine(first, swapped_back)

    def ask(self, prompt: str, answer_a: str, answer_b: str) -> str | None:
        """One verdict in one order, as the model replied it (None when its reply names no outcome)."""
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": USER_TEMPLATE.format(prompt=prompt, answer_a=answer_a, answer_b=answer_b)},
        ]
        return parse_verdict(self._complete(messages, VERDICT_MAX_TOKENS))

    def _complete(self, messages: list[dict], max_tokens: int) -> str:
        """The judge model's greedy reply; a server or model problem becomes one LoraflowError line."""
        import openai

        url, model = self.settings.server_url, self.settings.model
        try:
            response = self.client.chat.completions.create(
                model=model, messages=messages, max_tokens=max_tokens, temperature=0
            )
        except openai.APIConnectionError:
            raise LoraflowError(
                f"the llm judge cannot reach {url}: start the server (loraflow serve) or pass --judge-server URL."
            ) from None
        except openai.NotFoundError:
            raise LoraflowError(
                f"the server at {url} serves no model named {model!r}: pass --judge-model with a name it serves "
                f"(see {url.rstrip('/')}/v1/models)."
            ) from None
        except openai.APIStatusError as error:
            raise LoraflowError(f"the llm judge's model {model!r} at {url} failed: HTTP {error.status_code}") from None
        return response.choices[0].message.content or ""


@hookimpl
def register_judges(register) -> None:
    register(LlmJudge)
