"""`loraflow serve` against the real vLLM server and the official openai client, on a tiny model.

One server (and one replica started through the CLI) per module: starting vLLM is the slow part.
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import openai
import pytest

from tests.conftest import REPO, make_adapter, write_tiny_llama

API_KEY = "test-key"
PROMPT = "Tell me about the sea"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def setup(smollm2, tmp_path_factory):
    """A registry with pirate@1 and pirate@2 (live), other@1 on the served base, and one adapter on a foreign base."""
    from loraflow.hub.registry import Registry

    root = tmp_path_factory.mktemp("serve")
    base = write_tiny_llama(smollm2, root / "tiny-base", seed=0)
    foreign = write_tiny_llama(smollm2, root / "foreign-base", seed=1)
    registry = Registry(root / "registry" / "registry.json")
    adapters = root / "adapters-src"
    registry.publish(make_adapter(base, adapters / "p1", seed=1), "pirate", base=base)
    registry.publish(make_adapter(base, adapters / "p2", seed=2), "pirate", base=base, promote=True)
    registry.publish(make_adapter(base, adapters / "o1", seed=3), "other", base=base)
    registry.publish(make_adapter(foreign, adapters / "f1", seed=4), "foreign", base=foreign)
    return {"base": base, "registry": registry, "adapters": adapters}


@pytest.fixture(scope="module")
def server(setup):
    from loraflow.serve.launcher import start_server

    with start_server(setup["registry"].path, setup["base"], api_key=API_KEY, max_model_len=256) as running:
        yield running.wait_ready()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key=API_KEY, max_retries=0, timeout=60)


def complete(client, model: str) -> openai.types.Completion:
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)


def test_models_lists_the_base_and_every_adapter_name(server, client):
    ids = {model.id for model in client.models.list().data}
    assert {server.base_name, "pirate", "pirate@1", "pirate@2", "other", "other@1"} <= ids


@pytest.mark.parametrize("model", ["BASE", "pirate", "pirate@1"])
def test_chat_completions_and_streaming(server, client, model):
    model = server.base_name if model == "BASE" else model
    messages = [{"role": "user", "content": PROMPT}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    assert chat.choices[0].message.content
    streamed = client.chat.completions.create(
        model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    assert (
        "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
        == chat.choices[0].message.content
    )
    text = complete(client, model).choices[0].text
    streamed = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == text


def test_name_reaches_the_live_version_and_name_at_version_pins(server, client):
    live, first, second = complete(client, "pirate"), complete(client, "pirate@1"), complete(client, "pirate@2")
    assert live.model == "pirate@2"  # the answer names the version that produced it
    assert live.choices[0].text == second.choices[0].text
    assert first.choices[0].text != second.choices[0].text != complete(client, server.base_name).choices[0].text


def test_alias_addresses_its_version(setup, client):
    setup["registry"].set_alias("pirate@1", "production")
    answer = complete(client, "pirate@production")
    assert (answer.model, answer.choices[0].text) == ("pirate@1", complete(client, "pirate@1").choices[0].text)


def test_unknown_name_is_an_openai_404_listing_what_exists(server, client):
    with pytest.raises(openai.NotFoundError) as error:
        complete(client, "no-such-adapter")
    message = str(error.value)
    assert "no-such-adapter" in message and "pirate" in message and "other" in message and server.base_name in message
    with pytest.raises(
        openai.NotFoundError, match=r"pirate means pirate@2; versions: pirate@1 \(retired\), pirate@2 \(live\)"
    ):
        complete(client, "pirate@9")


def test_missing_or_wrong_api_key_is_401(server):
    with pytest.raises(openai.AuthenticationError):
        complete(openai.OpenAI(base_url=server.url, api_key="wrong-key", max_retries=0), "pirate")
    # The openai client refuses to send a request without a key, so send one bare.
    unauthenticated = httpx.post(
        server.url + "/completions", json={"model": "pirate", "prompt": PROMPT, "max_tokens": 2}
    )
    assert unauthenticated.status_code == 401


def test_adapter_for_another_base_is_refused_clearly(client):
    with pytest.raises(openai.BadRequestError, match="different base"):
        complete(client, "foreign")


def test_adapter_changed_after_publishing_is_refused(setup, client):
    version = setup["registry"].publish(
        make_adapter(setup["base"], setup["adapters"] / "t1", seed=5), "tampered", base=setup["base"]
    )
    weights = setup["registry"].folder(version) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(openai.BadRequestError, match="sha256"):
        complete(client, "tampered")


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, client):
    with pytest.raises(openai.NotFoundError):
        complete(client, "pirate-typo")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="pirate", prompt="sea " * 400, max_tokens=MAX_TOKENS)
    malformed = httpx.post(
        server.url + "/completions",
        content=b'{"model": "pirate", "prompt": ',
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    assert 400 <= malformed.status_code < 500
    assert complete(client, "pirate").choices[0].text


def test_an_idle_connection_outlives_the_clients_keep_alive(server):
    """httpx and the openai client reuse an idle connection for up to 5 s; were the server to close it at the same
    moment, a request sent on it would fail. So the server must keep it open for longer."""
    client_keep_alive_s = httpx.Limits().keepalive_expiry
    url = httpx.URL(server.root_url)
    request = f"GET /health HTTP/1.1\r\nHost: {url.host}\r\n\r\n".encode()
    with socket.create_connection((url.host, url.port), timeout=10) as connection:
        connection.sendall(request)
        assert connection.recv(4096).startswith(b"HTTP/1.1 200")
        closed, _, _ = select.select([connection], [], [], client_keep_alive_s + 1)  # readable: closed by the server
        assert not closed, f"the server closed an idle connection within {client_keep_alive_s + 1} s"
        connection.sendall(request)
        assert connection.recv(4096).startswith(b"HTTP/1.1 200")


class Traffic:
    """Four clients asking for `pirate` in a loop; every answer is kept with the time its request started."""

    def __init__(self, client):
        self.client = client
        self.answers: list[tuple[float, str, str]] = []  # (request start, version that answered, text)
        self.failures: list[BaseException] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._keep_asking) for _ in range(4)]

    def _keep_asking(self):
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                answer = complete(self.client, "pirate")
                self.answers.append((started, answer.model, answer.choices[0].text))
            except BaseException as error:  # every failure counts, whatever its type
                self.failures.append(error)

    def wait_for(self, ref: str, after: float = 0.0, count: int = 1, timeout_s: float = 60) -> None:
        """Until `count` answers from `ref` to requests started after `after`."""
        deadline = time.monotonic() + timeout_s
        while sum(model == ref and started > after for started, model, _ in self.answers) < count:
            assert time.monotonic() < deadline, f"no answer from {ref} within {timeout_s} s"
            assert not self.failures, self.failures
            self.stop.wait(0.05)

    def __enter__(self) -> "Traffic":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()


def test_publish_promote_reject_and_rollback_under_load(setup, client):
    """NAME follows only the lifecycle: a candidate or a rejected version is reached as NAME@V alone, a promote and
    a rollback switch NAME for every request that starts after them (none sees an older version), and no request
    fails."""
    registry, base = setup["registry"], setup["base"]
    timeline: list[tuple[str, float, float, str]] = []  # (step, began, ended, the version NAME answers with after it)

    @contextmanager
    def step(name: str, answers_with: str):
        """Time a lifecycle step, then wait for 8 answers as NAME from `answers_with` to requests started after it."""
        began = time.monotonic()
        yield
        timeline.append((name, began, time.monotonic(), answers_with))
        traffic.wait_for(answers_with, after=timeline[-1][2], count=8)

    with Traffic(client) as traffic:
        traffic.wait_for("pirate@2")
        folder = make_adapter(base, setup["adapters"] / "p3", seed=6)
        with step("published 3", "pirate@2"):
            assert registry.publish(folder, "pirate", base=base).state == "candidate"
        assert complete(client, "pirate@3").model == "pirate@3"
        with step("promoted 3", "pirate@3"):
            registry.promote("pirate@3", actor="test", reason="under load")
        folder = make_adapter(base, setup["adapters"] / "p4", seed=7)
        with step("promoted 4", "pirate@4"):
            registry.publish(folder, "pirate", base=base, promote=True)
        with step("rolled back", "pirate@3"):
            registry.rollback("pirate", actor="test", reason="bad answers")
        folder = make_adapter(base, setup["adapters"] / "p5", seed=9)
        with step("rejected 5", "pirate@3"):
            registry.publish(folder, "pirate", base=base)
            registry.reject("pirate@5", actor="test", reason="lost the gate")

    assert traffic.failures == []
    references = {f"pirate@{v}": complete(client, f"pirate@{v}").choices[0].text for v in (2, 3, 4, 5)}
    assert len(set(references.values())) == 4, "the versions must answer differently for this test to see the swaps"
    for started, model, text in traffic.answers:
        assert text == references[model], f"{model} answered {text!r}, its reference is {references[model]!r}"
        assert model != "pirate@5", "a rejected version answered as NAME"
        done = [(name, wanted) for name, _, end, wanted in timeline if end < started]
        if done:
            # Never an older version than the last finished step's; a later step's may answer, since the server
            # resolves NAME when the request arrives, a little after `started`.
            allowed = {done[-1][1]} | {wanted for _, _, end, wanted in timeline if end >= started}
            assert model in allowed, f"a request started after '{done[-1][0]}' was answered by {model}, not {allowed}"
    actions = [(event.action, event.version, event.actor) for event in registry.history("pirate")]
    assert ("promote", 3, "test") in actions and ("rollback", 3, "test") in actions and ("reject", 5, "test") in actions
    assert registry.get("pirate@4").state == "rejected" and registry.live("pirate").version == 3


def chat(client, model: str, messages: list[dict]) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0)


def test_a_prompt_version_answers_as_the_base_following_its_system_prompt(setup, server, client):
    system = "Answer in one word, in capital letters."
    setup["registry"].publish_prompt(system, "brief", base=setup["base"])
    asked = [{"role": "user", "content": PROMPT}]
    answer = chat(client, "brief", asked)
    by_hand = chat(client, server.base_name, [{"role": "system", "content": system}, *asked])
    assert answer.model == "brief@1"
    assert answer.choices[0].message.content == by_hand.choices[0].message.content
    plain = chat(client, server.base_name, asked)
    # The random tiny model may answer alike either way; the prompt it was given shows the system prompt was applied.
    assert answer.usage.prompt_tokens == by_hand.usage.prompt_tokens != plain.usage.prompt_tokens
    chunks = list(
        client.chat.completions.create(
            model="brief@1", messages=asked, max_tokens=MAX_TOKENS, temperature=0, stream=True
        )
    )
    assert {chunk.model for chunk in chunks} == {"brief@1"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="brief@1 is a prompt .* answers chat completions only"):
        complete(client, "brief")
    assert {"brief", "brief@1"} <= {model.id for model in client.models.list().data}


def test_a_canary_takes_its_share_of_2000_requests_until_promote_or_rollback(setup, client):
    from concurrent.futures import ThreadPoolExecutor

    registry, base = setup["registry"], setup["base"]
    for seed in (11, 12, 13):
        registry.publish(make_adapter(base, setup["adapters"] / f"canary{seed}", seed=seed), "canary", base=base)

    def answered_by(count: int) -> list[str]:
        def one(_):
            return client.completions.create(model="canary", prompt=PROMPT, max_tokens=1).model

        with ThreadPoolExecutor(16) as pool:
            return list(pool.map(one, range(count)))

    registry.start_canary("canary@2", 10)
    raw = client.completions.with_raw_response.create(model="canary", prompt=PROMPT, max_tokens=1)
    assert raw.headers["x-loraflow-version"] == raw.parse().model, "the header names the version, as the body does"
    models = answered_by(2000)
    assert set(models) == {"canary@1", "canary@2"}
    share = models.count("canary@2") / len(models)
    assert abs(share - 0.10) <= 0.03, f"the canary answered {share:.1%} of 2,000 requests, not 10% +- 3 points"
    registry.promote("canary@2")
    assert set(answered_by(50)) == {"canary@2"}, "a promote ends the canary"
    registry.start_canary("canary@3", 50)
    assert set(answered_by(50)) == {"canary@2", "canary@3"}
    registry.rollback("canary")
    assert set(answered_by(50)) == {"canary@2"}, "a rollback during a canary keeps the live version"
    assert registry.get("canary@3").state == "rejected"


@pytest.fixture(scope="module")
def cli_replica(setup, server):
    """A second server on the same registry, started by `loraflow serve`."""
    port = str(server.settings.port + 1)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "loraflow.hub.cli",
            "--registry",
            str(setup["registry"].path),
            "serve",
            "--base",
            str(setup["base"].path),
            "--port",
            port,
            "--api-key",
            API_KEY,
            "--max-model-len",
            "256",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env={**os.environ, "COLUMNS": "200"},
    )
    lines = []
    for line in process.stdout:  # returns when the server prints its adapter names, or exits
        lines.append(line)
        if line.strip().startswith("adapters:"):
            break
    threading.Thread(target=process.stdout.read, daemon=True).start()  # keep draining its output
    yield "".join(lines)
    process.send_signal(signal.SIGTERM)  # what a process manager sends; the CLI stops vLLM and exits cleanly
    assert process.wait(60) == 0


def test_cli_serve_prints_url_and_adapter_names(cli_replica, server):
    url = re.search(r"serving (http://\S+/v1)", cli_replica)
    assert url, cli_replica
    assert url.group(1) == f"http://127.0.0.1:{server.settings.port + 1}/v1"
    adapters = re.search(r"adapters:\s*(.*)", cli_replica).group(1)
    assert {"pirate", "other"} <= set(adapters.replace(",", " ").split())


def test_replicas_on_one_registry_both_serve_an_adapter_published_after_start(setup, client, cli_replica):
    url = re.search(r"serving (http://\S+/v1)", cli_replica).group(1)
    replica = openai.OpenAI(base_url=url, api_key=API_KEY, max_retries=0, timeout=60)
    assert complete(replica, "pirate").model == complete(client, "pirate").model == setup["registry"].live("pirate").ref
    setup["registry"].publish(
        make_adapter(setup["base"], setup["adapters"] / "late", seed=8), "late", base=setup["base"]
    )
    first, second = complete(client, "late"), complete(replica, "late")
    assert first.model == second.model == "late@1"
    assert first.choices[0].text == second.choices[0].text


def test_a_restarted_server_serves_every_registry_adapter(setup, server, client):
    from loraflow.serve.launcher import start_server

    before = {ref: complete(client, ref).choices[0].text for ref in ("pirate@1", "pirate@4", "other@1")}
    server.stop()
    with start_server(setup["registry"].path, setup["base"], api_key=API_KEY, max_model_len=256) as restarted:
        restarted.wait_ready()
        again = openai.OpenAI(base_url=restarted.url, api_key=API_KEY, max_retries=0, timeout=60)
        refused, prompts = {"foreign", "tampered"}, {"brief"}
        ids = setup["registry"].snapshot().model_ids()
        names = [i for i in ids if i.partition("@")[0] not in refused | prompts]
        assert {"late", "pirate@4", "other@1"} <= set(names)
        for name in names:
            assert complete(again, name).choices[0].text
        assert chat(again, "brief", [{"role": "user", "content": PROMPT}]).model == "brief@1"
        assert {ref: complete(again, ref).choices[0].text for ref in before} == before
