"""Prometheus /metrics per version and replica: on a real vLLM server with the tiny model, scraped and parsed with
prometheus_client's parser; the fleet's merge of its replicas' series without a server."""

from __future__ import annotations

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import make_adapter, write_tiny_llama

API_KEY = "test-key"
PROMPT = "Tell me about the sea"


def scrape(root_url: str) -> dict[tuple[str, str, str], float]:
    """{(sample name, version, replica): value} of the loraflow_* series, histogram buckets left out."""
    response = httpx.get(root_url + "/metrics", timeout=30)
    response.raise_for_status()
    samples = {}
    for family in text_string_to_metric_families(response.text):
        if family.name.startswith("loraflow_"):
            for sample in family.samples:
                if "le" not in sample.labels:
                    samples[sample.name, sample.labels["version"], sample.labels["replica"]] = sample.value
    return samples


@pytest.fixture(scope="module")
def server(smollm2, tmp_path_factory):
    """a@1 and b@1 on the tiny base, and brief@1, a prompt version; the engine holds one adapter at a time, so loading
    one evicts the other."""
    from loraflow.hub.registry import Registry
    from loraflow.serve.launcher import start_server

    root = tmp_path_factory.mktemp("metrics")
    base = write_tiny_llama(smollm2, root / "tiny-base", seed=0)
    registry = Registry(root / "registry" / "registry.json")
    for seed, name in enumerate(("a", "b"), start=1):
        registry.publish(make_adapter(base, root / "src" / name, seed=seed), name, base=base)
    registry.publish_prompt("Answer in one word.", "brief", base=base)
    with start_server(registry.path, base, api_key=API_KEY, max_model_len=256, max_loras=1, max_cpu_loras=1) as running:
        yield running.wait_ready()


def test_requests_errors_tokens_first_token_times_and_residency_per_version(server):
    client = openai.OpenAI(base_url=server.url, api_key=API_KEY, max_retries=0, timeout=60)
    replica = f"{server.settings.host}:{server.settings.port}"

    # What a fleet replica does to load a version: /tokenize loads it into the engine, and is not a request.
    assert httpx.post(server.root_url + "/tokenize", json={"model": "b", "prompt": " "}).status_code == 200
    loaded = scrape(server.root_url)
    assert loaded[("loraflow_adapter_resident", "b@1", replica)] == 1
    assert not [key for key in loaded if key[0] == "loraflow_requests_total"]

    usage = {"a@1": 0, "b@1": 0, "brief@1": 0, server.base_name: 0}
    answer = client.completions.create(model="b", prompt=PROMPT, max_tokens=8, temperature=0)
    usage[answer.model] += answer.usage.completion_tokens
    answer = client.completions.create(model="a", prompt=PROMPT, max_tokens=8, temperature=0)
    usage[answer.model] += answer.usage.completion_tokens
    stream = client.completions.create(
        model="a@1", prompt=PROMPT, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    usage["a@1"] += [chunk.usage for chunk in stream if chunk.usage][0].completion_tokens
    chat = client.chat.completions.create(
        model=server.base_name, messages=[{"role": "user", "content": PROMPT}], max_tokens=8, temperature=0
    )
    usage[chat.model] += chat.usage.completion_tokens
    chat = client.chat.completions.create(  # the base answers, with the version's system prompt
        model="brief", messages=[{"role": "user", "content": PROMPT}], max_tokens=8, temperature=0
    )
    usage[chat.model] += chat.usage.completion_tokens
    with pytest.raises(openai.BadRequestError):  # longer than --max-model-len: an error of a@1
        client.completions.create(model="a", prompt="sea " * 400, max_tokens=8)
    with pytest.raises(openai.NotFoundError):  # a client's string never becomes a label
        client.completions.create(model="no-such-adapter", prompt=PROMPT, max_tokens=8)

    after = scrape(server.root_url)
    assert {key[2] for key in after} == {replica}
    versions = {"a@1", "b@1", "brief@1", server.base_name, "(unresolved)"}
    assert {key[1] for key in after if key[0] == "loraflow_requests_total"} == versions
    requests = {version: after[("loraflow_requests_total", version, replica)] for version in versions}
    errors = {version: after.get(("loraflow_request_errors_total", version, replica), 0) for version in versions}
    assert requests == {"a@1": 3, "b@1": 1, "brief@1": 1, server.base_name: 1, "(unresolved)": 1}
    assert errors == {"a@1": 1, "b@1": 0, "brief@1": 0, server.base_name: 0, "(unresolved)": 1}
    assert all(tokens > 0 for tokens in usage.values())
    assert {version: after[("loraflow_generated_tokens_total", version, replica)] for version in usage} == usage
    for version, answered in {"a@1": 2, "b@1": 1, "brief@1": 1, server.base_name: 1}.items():
        assert after[("loraflow_time_to_first_token_seconds_count", version, replica)] == answered
        assert after[("loraflow_time_to_first_token_seconds_sum", version, replica)] > 0
    # a@1 was loaded last; with room for one adapter, loading it evicted b@1, which stays resolved.
    assert after[("loraflow_adapter_resident", "a@1", replica)] == 1
    assert after[("loraflow_adapter_resident", "b@1", replica)] == 0
    assert ("loraflow_adapter_resident", "brief@1", replica) not in after  # a prompt has nothing to load


def test_a_fleet_merges_its_replicas_families_once_each():
    from loraflow.serve.metrics import merge_expositions

    def replica_text(replica: str, requests: int) -> str:
        return (
            "# HELP loraflow_requests_total Requests.\n# TYPE loraflow_requests_total counter\n"
            f'loraflow_requests_total{{replica="{replica}",version="a@1"}} {requests}\n'
            "# HELP loraflow_adapter_resident Resident.\n# TYPE loraflow_adapter_resident gauge\n"
            f'loraflow_adapter_resident{{replica="{replica}",version="a@1"}} 1\n'
            "# HELP vllm:num_requests_running Running.\n# TYPE vllm:num_requests_running gauge\n"
            'vllm:num_requests_running{model_name="tiny"} 0\n'
        )

    merged = merge_expositions([replica_text("r1", 3), replica_text("r2", 5)]).decode()
    type_lines = [line for line in merged.splitlines() if line.startswith("# TYPE")]
    assert type_lines == ["# TYPE loraflow_requests_total counter", "# TYPE loraflow_adapter_resident gauge"]
    families = {family.name: family for family in text_string_to_metric_families(merged)}
    assert set(families) == {"loraflow_requests", "loraflow_adapter_resident"}
    requests = {sample.labels["replica"]: sample.value for sample in families["loraflow_requests"].samples}
    assert requests == {"r1": 3, "r2": 5}
