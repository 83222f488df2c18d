"""`loraflow serve` against the real vLLM server and the official openai client, on a tiny model.

One server (and one replica started through the CLI) per module: starting vLLM is the slow part.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import REPO, make_adapter, write_tiny_llama

API_KEY = "test-key"
PROMPT = "Tell me about the sea"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def setup(smollm2, tmp_path_factory):
    """A registry with pirate@1, pirate@2 and other@1 on the served base, and one adapter on a foreign base."""
    from hub.registry import Registry

    root = tmp_path_factory.mktemp("serve")
    base = write_tiny_llama(smollm2, root / "tiny-base", seed=0)
    foreign = write_tiny_llama(smollm2, root / "foreign-base", seed=1)
    registry = Registry(root / "registry" / "registry.json")
    adapters = root / "adapters-src"
    registry.publish(make_adapter(base, adapters / "p1", seed=1), "pirate", base=base)
    registry.publish(make_adapter(base, adapters / "p2", seed=2), "pirate", base=base)
    registry.publish(make_adapter(base, adapters / "o1", seed=3), "other", base=base)
    registry.publish(make_adapter(foreign, adapters / "f1", seed=4), "foreign", base=foreign)
    return {"base": base, "registry": registry, "adapters": adapters}


@pytest.fixture(scope="module")
def server(setup):
    from serve.launcher import start_server

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
    streamed = client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices) == chat.choices[0].message.content
    text = complete(client, model).choices[0].text
    streamed = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == text


def test_name_reaches_latest_and_name_at_version_pins(server, client):
    latest, first, second = complete(client, "pirate"), complete(client, "pirate@1"), complete(client, "pirate@2")
    assert latest.model == "pirate@2"  # the answer names the version that produced it
    assert latest.choices[0].text == second.choices[0].text
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
    with pytest.raises(openai.NotFoundError, match="pirate@1, pirate@2"):
        complete(client, "pirate@9")


def test_missing_or_wrong_api_key_is_401(server):
    with pytest.raises(openai.AuthenticationError):
        complete(openai.OpenAI(base_url=server.url, api_key="wrong-key", max_retries=0), "pirate")
    # The openai client refuses to send a request without a key, so send one bare.
    unauthenticated = httpx.post(server.url + "/completions", json={"model": "pirate", "prompt": PROMPT, "max_tokens": 2})
    assert unauthenticated.status_code == 401


def test_adapter_for_another_base_is_refused_clearly(client):
    with pytest.raises(openai.BadRequestError, match="different base"):
        complete(client, "foreign")


def test_adapter_changed_after_publishing_is_refused(setup, client):
    version = setup["registry"].publish(make_adapter(setup["base"], setup["adapters"] / "t1", seed=5), "tampered", base=setup["base"])
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


def test_hot_swap_under_load_fails_nothing_and_serves_the_new_version(setup, client):
    """Four clients keep asking for `pirate` while pirate@3 and pirate@4 are published."""
    registry, base = setup["registry"], setup["base"]
    answers: list[tuple[float, str, str]] = []  # (request start, version that answered, text)
    failures: list[BaseException] = []
    stop = threading.Event()

    def keep_asking():
        while not stop.is_set():
            started = time.monotonic()
            try:
                answer = complete(client, "pirate")
                answers.append((started, answer.model, answer.choices[0].text))
            except BaseException as error:  # every failure counts, whatever its type
                failures.append(error)

    def wait_for(ref: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(model == ref for _, model, _ in answers):
            assert time.monotonic() < deadline, f"no answer from {ref} within {timeout_s} s"
            assert not failures, failures
            stop.wait(0.05)

    clients = [threading.Thread(target=keep_asking) for _ in range(4)]
    for thread in clients:
        thread.start()
    try:
        wait_for("pirate@2")
        published = {}
        for version, seed in ((3, 6), (4, 7)):
            folder = make_adapter(base, setup["adapters"] / f"p{version}", seed=seed)
            assert registry.publish(folder, "pirate", base=base).version == version
            published[version] = time.monotonic()
            wait_for(f"pirate@{version}")
        after_last = time.monotonic()
        while sum(started > after_last for started, _, _ in answers) < 8:
            assert not failures, failures
            stop.wait(0.05)
    finally:
        stop.set()
        for thread in clients:
            thread.join()

    assert failures == []
    references = {f"pirate@{v}": complete(client, f"pirate@{v}").choices[0].text for v in (2, 3, 4)}
    assert len(set(references.values())) == 3, "the versions must answer differently for this test to see the swap"
    for started, model, text in answers:
        assert text == references[model], f"{model} answered {text!r}, its reference is {references[model]!r}"
        if started > published[4]:
            assert model == "pirate@4"
        elif started > published[3]:
            assert model in ("pirate@3", "pirate@4")


@pytest.fixture(scope="module")
def cli_replica(setup, server):
    """A second server on the same registry, started by `loraflow serve`, serving NAME behind `production`."""
    port = str(server.settings.port + 1)
    process = subprocess.Popen(
        [sys.executable, "-m", "hub.cli", "--registry", str(setup["registry"].path), "serve", "--base", str(setup["base"].path),
         "--port", port, "--api-key", API_KEY, "--alias", "production", "--max-model-len", "256"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env={**os.environ, "COLUMNS": "200"},
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
    assert complete(replica, "pirate").model == "pirate@1"  # bare NAME follows --alias production on this replica
    setup["registry"].publish(make_adapter(setup["base"], setup["adapters"] / "late", seed=8), "late", base=setup["base"])
    first, second = complete(client, "late"), complete(replica, "late")
    assert first.model == second.model == "late@1"
    assert first.choices[0].text == second.choices[0].text


def test_a_restarted_server_serves_every_registry_adapter(setup, server, client):
    from serve.naming import LiveRegistry
    from serve.launcher import start_server

    before = {ref: complete(client, ref).choices[0].text for ref in ("pirate@1", "pirate@4", "other@1")}
    server.stop()
    with start_server(setup["registry"].path, setup["base"], api_key=API_KEY, max_model_len=256) as restarted:
        restarted.wait_ready()
        again = openai.OpenAI(base_url=restarted.url, api_key=API_KEY, max_retries=0, timeout=60)
        refused = {"foreign", "tampered"}
        names = [i for i in LiveRegistry(setup["registry"].path).model_ids() if i.partition("@")[0] not in refused]
        assert {"late", "pirate@4", "other@1"} <= set(names)
        for name in names:
            assert complete(again, name).choices[0].text
        assert {ref: complete(again, ref).choices[0].text for ref in before} == before
