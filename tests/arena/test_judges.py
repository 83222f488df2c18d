"""Judges as plugins: the register_judges hook, a third-party judge, and the llm judge's position swap.

The llm judge is tested against a small local HTTP server that implements the one OpenAI endpoint loraflow uses
here, /v1/chat/completions (streamed or not), so the real `openai` client makes real requests.
"""

from __future__ import annotations

import ast
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from loraflow.arena.judge import JudgeSettings, PirateJudge, is_pirate, load_judge, simulate_votes
from loraflow.arena.llm_judge import LlmJudge, combine, parse_verdict
from loraflow.arena.votes import OUTCOMES, VoteStore
from loraflow.hub import plugins
from loraflow.hub.errors import LoraflowError
from tests.conftest import FIXTURES, PIRATE, REPO, run_loraflow
from tests.hub.test_plugins import pip_install_target

JUDGE_FIXTURE = FIXTURES / "loraflow-judge-fixture"
UNKNOWN_MODEL = "no-such-model"


def pirate_reply(user_message: str) -> str:
    """A fair judge model for the pirate task, replying in the loose ways real models do."""
    answer_a = re.search(r"\[Answer A\]\n(.*?)\n\[End of answer A\]", user_message, re.S)
    answer_b = re.search(r"\[Answer B\]\n(.*?)\n\[End of answer B\]", user_message, re.S)
    if not (answer_a and answer_b):
        return "OK"
    a, b = is_pirate(answer_a.group(1)), is_pirate(answer_b.group(1))
    if a != b:
        return "**A**" if a else "Answer: B"
    return "TIE" if a else "Both bad."


def reply_for(model: str, messages: list[dict]) -> str:
    """What each served model says: two judge models, one that babbles, and contestants whose answers differ."""
    user_message = messages[-1]["content"]
    if model == "judge-first":
        return "A"  # pure position bias: whatever it reads first wins
    if model == "judge-pirate":
        return pirate_reply(user_message)
    if model == "judge-babbles":
        return "I cannot decide."
    return f"Arr, {model} says hello." if "pirate@2" in model else f"Hello from {model}."


class OpenAIHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        model = request["model"]
        if self.path != "/v1/chat/completions" or model == UNKNOWN_MODEL:
            message = f"The model `{model}` does not exist."
            return self._send(404, {"error": {"message": message, "type": "NotFoundError", "code": 404}})
        self.server.requests.append(request)
        content = reply_for(model, request["messages"])
        if not request.get("stream"):
            choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
            return self._send(
                200, {"id": "c", "object": "chat.completion", "created": 0, "model": model, "choices": [choice]}
            )
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for piece in (content[:5], content[5:]):
            choice = {"index": 0, "delta": {"content": piece}, "finish_reason": None}
            chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": model, "choices": [choice]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture(scope="module")
def openai_server():
    """A local OpenAI-compatible HTTP server; `.requests` holds every chat request it answered."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), OpenAIHandler)
    server.requests = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def url_of(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def llm_judge(server, model: str) -> LlmJudge:
    return load_judge("llm", JudgeSettings(server_url=url_of(server), model=model))


@pytest.fixture(scope="module")
def judge_plugin(tmp_path_factory) -> Path:
    return pip_install_target(JUDGE_FIXTURE, tmp_path_factory.mktemp("judge-plugin"))


def test_register_judges():
    """The hook registers the built-in judges from loraflow's own entry points, like any plugin's."""
    judges = plugins.get_plugins().judges
    assert {"pirate", "concise", "llm"} <= set(judges)
    assert judges["pirate"].judge_class is PirateJudge and judges["llm"].judge_class is LlmJudge
    built_in = ("pirate", "concise", "llm")
    assert all(judges[name].source.package == "loraflow" and judges[name].description for name in built_in)


def test_the_pirate_judge_is_the_pirate_rule():
    pirate = load_judge("pirate")
    assert pirate.judge("p", "Arr, 4.", "4.") == "a"
    assert pirate.judge("p", "4.", "  arr 4") == "b"
    assert pirate.judge("p", "Arr", "Arr") == "tie"
    assert pirate.judge("p", "4", "four") == "both_bad"


def test_the_concise_judge_prefers_the_clearly_shorter_answer():
    concise = load_judge("concise")
    assert concise.judge("p", "Paris.", "The capital of France is Paris.") == "a"
    assert concise.judge("p", "one two three four five six", "one two three four five") == "tie"  # 5/6 words
    assert concise.judge("p", "one two three four five six", "one two three four") == "b"
    assert concise.judge("p", "", "Paris.") == "b" and concise.judge("p", " ", "") == "both_bad"


def test_an_unknown_judge_fails_naming_the_installed_ones():
    with pytest.raises(LoraflowError, match=r"no judge named 'nope'; installed judges: concise, llm, pirate"):
        plugins.get_plugins().judge("nope")
    result = run_loraflow("judge", "a", "b", "--judge", "nope", "--server", "http://127.0.0.1:9", check=False)
    assert result.returncode == 2
    assert "no judge named 'nope'" in result.stderr and "llm, pirate" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_third_party_judge_is_found_through_its_entry_point(judge_plugin, monkeypatch):
    monkeypatch.syspath_prepend(str(judge_plugin))
    found = plugins.get_plugins.__wrapped__()
    info = found.judge("longer")
    assert (info.source.package, info.source.version, info.source.entry_point) == (
        "loraflow-judge-fixture",
        "0.1.0",
        "longer",
    )
    assert {"pirate", "llm", "longer"} <= set(found.judges) and found.failures == []
    longer = info.judge_class(JudgeSettings())
    assert longer.judge("p", "a long answer", "short") == "a"


def test_a_third_party_judge_votes_through_votes_simulate(
    judge_plugin, openai_server, tiny_base, tiny_adapter, registry, tmp_path
):
    registry.publish(tiny_adapter, "pirate", base=tiny_base, trainer={"name": "external"})
    votes = tmp_path / "votes.db"
    result = run_loraflow(
        *("--registry", str(registry.path), "votes", "simulate", "pirate", "--rounds", "6"),
        *("--server", url_of(openai_server), "--votes", str(votes), "--base", str(tiny_base.path)),
        *("--prompts", str(PIRATE / "train.jsonl"), "--judge", "longer"),
        env={"PYTHONPATH": f"{judge_plugin}:{REPO}"},
    )
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["judge"] == "longer" and sum(summary["outcomes"].values()) == 6
    stored = VoteStore(str(votes), rate_limit=None, create=False).votes()
    assert len(stored) == 6
    for vote in stored:
        assert vote.session_id.startswith("judge-longer-"), "a judge's votes must be told apart from people's"
        a, b = len(vote.answer_a), len(vote.answer_b)
        assert vote.outcome == ("tie" if a == b else "a" if a > b else "b")


def test_the_fixture_judge_imports_only_the_public_api():
    module = ast.parse((JUDGE_FIXTURE / "loraflow_judge_fixture.py").read_text())
    imported = {node.module for node in ast.walk(module) if isinstance(node, ast.ImportFrom) and node.module}
    assert {name for name in imported if name.startswith("loraflow")} == {"loraflow"}


@pytest.mark.parametrize(
    "reply, outcome",
    [
        ("A", "a"),
        (" b\n", "b"),
        ("**A**", "a"),
        ("Answer: B", "b"),
        ("[[TIE]]", "tie"),
        ("Both bad.", "both_bad"),
        ("BAD", "both_bad"),
        ("A is better than B", "a"),
        ("The better answer is B.", "b"),
        ("I cannot decide.", None),
        ("", None),
    ],
)
def test_parse_verdict_reads_loose_one_word_replies(reply, outcome):
    assert parse_verdict(reply) == outcome


def test_combine_keeps_a_verdict_only_when_both_orders_agree():
    assert combine("a", "a") == "a" and combine("both_bad", "both_bad") == "both_bad"
    assert combine("a", "b") == "tie" and combine(None, None) == "tie" and combine("b", None) == "tie"


def test_llm_judge_swaps_positions_against_a_local_openai_compatible_http_server(openai_server):
    biased = llm_judge(openai_server, "judge-first")
    openai_server.requests.clear()
    assert biased.judge("What is 2 plus 2?", "Arr, 4.", "4.") == "tie", "a position-biased judge must not decide"
    first, second = (request["messages"][-1]["content"] for request in openai_server.requests)
    assert "[Answer A]\nArr, 4.\n" in first and "[Answer B]\n4.\n" in first
    assert "[Answer A]\n4.\n" in second and "[Answer B]\nArr, 4.\n" in second
    assert "What is 2 plus 2?" in first and all(r["temperature"] == 0 for r in openai_server.requests)

    fair = llm_judge(openai_server, "judge-pirate")
    assert fair.judge("p", "Arr, 4.", "4.") == "a"
    assert fair.judge("p", "4.", "Arr, 4.") == "b"
    assert fair.judge("p", "Arr", "Arr!") == "tie"
    assert fair.judge("p", "4", "four") == "both_bad"
    assert llm_judge(openai_server, "judge-babbles").judge("p", "Arr", "4") == "tie"


def test_llm_judge_errors_are_one_line(openai_server):
    with pytest.raises(LoraflowError, match="needs a model to ask: pass --judge-model"):
        load_judge("llm", JudgeSettings(server_url=url_of(openai_server)))
    with pytest.raises(LoraflowError, match=f"serves no model named '{UNKNOWN_MODEL}'") as unknown:
        llm_judge(openai_server, UNKNOWN_MODEL)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    with pytest.raises(LoraflowError, match=f"cannot reach {closed}") as unreachable:
        load_judge("llm", JudgeSettings(server_url=closed, model="judge-pirate"))
    assert "\n" not in str(unknown.value) and "\n" not in str(unreachable.value)


def test_loraflow_judge_compares_two_models_with_the_llm_judge(openai_server, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {n}?"}) + "\n" for n in range(3)))
    result = run_loraflow(
        *("judge", "pirate@1", "pirate@2", "--prompts", str(prompts), "--server", url_of(openai_server)),
        *("--judge", "llm", "--judge-model", "judge-pirate"),
    )
    assert "pirate@1 0, pirate@2 3" in result.stdout
    assert "head to head (llm judge): pirate@2 won 3 of 3 decisive (100%)" in result.stdout


def test_simulate_votes_checks_what_a_judge_returns(openai_server, tiny_base, tiny_adapter, registry, tmp_path):
    from loraflow.arena.rounds import Arena, ArenaSettings

    class Sloppy:
        name, description = "sloppy", "Returns a word that is no vote outcome."

        def judge(self, prompt, answer_a, answer_b):
            return "A wins"

    registry.publish(tiny_adapter, "pirate", base=tiny_base, trainer={"name": "external"})
    settings = ArenaSettings(names=["pirate"], server_url=url_of(openai_server), base_model="tiny")
    arena = Arena(settings, registry, VoteStore(str(tmp_path / "votes.db"), rate_limit=None))
    with pytest.raises(LoraflowError, match=r"judge 'sloppy' returned 'A wins'; a judge returns one of a, b, tie"):
        simulate_votes(arena, ["hi"], rounds=1, judge=Sloppy())
    assert "both_bad" in OUTCOMES and arena.store.count() == 0
