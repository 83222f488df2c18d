"""The engine keeps at most --max-cpu-loras adapters: past that, the least recently used version is unloaded.

Real vLLM on the tiny model, with room for two adapters; `/v1/loraflow/adapters` shows what the engine holds.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import make_adapter, write_tiny_llama

API_KEY = "test-key"


@pytest.fixture(scope="module")
def setup(smollm2, tmp_path_factory):
    from loraflow.hub.registry import Registry

    root = tmp_path_factory.mktemp("lru")
    base = write_tiny_llama(smollm2, root / "tiny-base", seed=0)
    registry = Registry(root / "registry" / "registry.json")
    for seed, name in enumerate(("a", "b", "c"), start=1):
        registry.publish(make_adapter(base, root / "src" / name, seed=seed), name, base=base)
    return {"root": root, "base": base, "registry": registry}


@pytest.fixture(scope="module")
def server(setup):
    from loraflow.serve.launcher import start_server

    with start_server(
        setup["registry"].path, setup["base"], api_key=API_KEY, max_model_len=256, max_loras=1, max_cpu_loras=2
    ) as running:
        yield running.wait_ready()


def ask(server, model: str) -> str:
    client = openai.OpenAI(base_url=server.url, api_key=API_KEY, max_retries=0, timeout=60)
    answer = client.completions.create(model=model, prompt="Tell me about the sea", max_tokens=8, temperature=0)
    return answer.choices[0].text


def loaded(server) -> set[str]:
    response = httpx.get(f"{server.url}/loraflow/adapters", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    response.raise_for_status()
    body = response.json()
    assert body["max_cpu_loras"] == 2
    return {entry["model"] for entry in body["adapters"] if entry["loaded"]}


def test_least_recently_used_versions_are_unloaded_and_reload_on_demand(setup, server):
    first = {name: ask(server, name) for name in ("a", "b")}
    assert loaded(server) == {"a@1", "b@1"}
    ask(server, "c")
    assert loaded(server) == {"b@1", "c@1"}, "a@1 was used least recently, so loading c@1 must unload it"

    assert ask(server, "a") == first["a"], "an unloaded version answers as before once it is loaded again"
    assert loaded(server) == {"c@1", "a@1"}

    registry, base = setup["registry"], setup["base"]
    registry.publish(make_adapter(base, setup["root"] / "src" / "a2", seed=9), "a", base=base, promote=True)
    assert ask(server, "a") != first["a"]
    assert loaded(server) == {"a@1", "a@2"}
    ask(server, "b")
    assert loaded(server) == {"a@2", "b@1"}, "the superseded a@1 is unloaded once capacity needs its place"


def test_adapters_route_needs_the_api_key(server):
    assert httpx.get(f"{server.url}/loraflow/adapters", timeout=30).status_code == 401
