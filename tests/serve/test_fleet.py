"""`loraflow serve --replicas 2`: two vLLM replicas of a tiny model on a local Ray, driven through the CLI and the
official openai client. One fleet per module: starting it (Ray, then two vLLM engines) is the slow part.
"""

from __future__ import annotations

import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from tests.conftest import (
    REPO,
    make_adapter,
    process_running,
    run_loraflow,
    start_and_read_until,
    write_tiny_llama,
)

API_KEY = "fleet-key"
PROMPT = "Tell me about the sea"
MAX_TOKENS = 8
START_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def setup(smollm2, tmp_path_factory):
    """A registry with pirate@1 and pirate@2 (live) and other@1, all on the served tiny base."""
    from loraflow.hub.registry import Registry

    root = tmp_path_factory.mktemp("fleet")
    base = write_tiny_llama(smollm2, root / "tiny-base", seed=0)
    registry = Registry(root / "registry" / "registry.json")
    adapters = root / "adapters-src"
    registry.publish(make_adapter(base, adapters / "p1", seed=1), "pirate", base=base)
    registry.publish(make_adapter(base, adapters / "p2", seed=2), "pirate", base=base, promote=True)
    registry.publish(make_adapter(base, adapters / "o1", seed=3), "other", base=base)
    return {"base": base, "registry": registry}


@pytest.fixture(scope="module")
def fleet(setup):
    """`loraflow serve --replicas 2`, ready once it prints its adapters; SIGTERM stops it and every vLLM it ran."""
    from loraflow.serve.fleet_ack import fleet_status
    from loraflow.serve.launcher import free_port

    port = free_port()
    command = [sys.executable, "-m", "loraflow.hub.cli", "--registry", str(setup["registry"].path), "serve"]
    command += ["--base", str(setup["base"].path), "--port", str(port), "--api-key", API_KEY]
    command += ["--max-model-len", "256", "--replicas", "2"]
    began = time.monotonic()
    process, output = start_and_read_until(
        command, "adapters:", START_TIMEOUT_S, cwd=REPO, env={**os.environ, "COLUMNS": "200"}
    )
    url = re.search(r"serving (http://\S+)/v1", output)
    assert url, f"`loraflow serve --replicas 2` did not start:\n{output}"
    print(f"\nfleet of 2 ready in {time.monotonic() - began:.0f} s")
    running = {"url": url.group(1), "output": output, "pids": set()}
    yield running
    running["pids"] |= {replica["vllm_pid"] for replica in fleet_status(running["url"], API_KEY)["replicas"]}
    process.send_signal(signal.SIGTERM)  # what a process manager sends; the CLI removes the fleet and exits cleanly
    assert process.wait(120) == 0
    left = [pid for pid in running["pids"] if process_running(pid)]
    assert not left, f"vLLM processes outlived the fleet: {left}"
    assert not list((setup["registry"].path.parent / ".loraflow-fleets").glob("*.json")), "the fleet record remains"


@pytest.fixture(scope="module")
def client(fleet):
    return openai.OpenAI(base_url=fleet["url"] + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def status(fleet) -> dict:
    from loraflow.serve.fleet_ack import fleet_status

    return fleet_status(fleet["url"], API_KEY)


def complete(client, model: str, stream: bool = False):
    """(version named by the answer's model field, x-loraflow-version, x-loraflow-replica, text)."""
    raw = client.completions.with_raw_response.create(
        model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stream=stream
    )
    answer = raw.parse()
    if stream:
        chunks = list(answer)
        text, named = "".join(chunk.choices[0].text for chunk in chunks), chunks[0].model
    else:
        text, named = answer.choices[0].text, answer.model
    return named, raw.headers.get("x-loraflow-version"), raw.headers.get("x-loraflow-replica"), text


def test_openai_client_completions_and_chat_with_streaming(fleet, client, setup):
    ids = {model.id for model in client.models.list().data}
    assert {"tiny-base", "pirate", "pirate@1", "pirate@2", "other"} <= ids
    named, version, replica, text = complete(client, "pirate")
    assert named == version == "pirate@2" and replica and text  # the answer names the version that produced it
    assert complete(client, "pirate", stream=True)[3] == text
    assert complete(client, "pirate@1")[3] != text
    for model in ("tiny-base", "pirate"):
        messages = [{"role": "user", "content": PROMPT}]
        chat = client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
        streamed = client.chat.completions.create(
            model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True
        )
        pieces = [chunk for chunk in streamed if chunk.choices]
        assert "".join(chunk.choices[0].delta.content or "" for chunk in pieces) == chat.choices[0].message.content
        assert chat.model == pieces[0].model == ("pirate@2" if model == "pirate" else model)


def test_api_key_and_unknown_names_behave_as_on_one_server(fleet, client):
    with pytest.raises(openai.AuthenticationError):
        complete(openai.OpenAI(base_url=fleet["url"] + "/v1", api_key="wrong", max_retries=0), "pirate")
    bare = httpx.post(fleet["url"] + "/v1/completions", json={"model": "pirate", "prompt": PROMPT, "max_tokens": 2})
    assert bare.status_code == 401
    assert httpx.get(fleet["url"] + "/v1/loraflow/fleet").status_code == 401
    with pytest.raises(openai.NotFoundError, match="pirate"):
        complete(client, "no-such-adapter")
    assert httpx.get(fleet["url"] + "/health").status_code == 200


def test_requests_for_one_version_stay_on_the_replica_that_holds_it(fleet, client):
    for ref in ("pirate@1", "other@1"):
        replicas = {complete(client, ref)[2] for _ in range(6)}
        assert len(replicas) == 1, f"{ref} was answered by {replicas}"
        holders = [replica["replica"] for replica in status(fleet)["replicas"] if ref in replica["holds"]]
        assert holders == list(replicas), f"{ref} is held by {holders}, answered by {replicas}"
    # NAME is routed as the version it means: to the replica holding pirate@2.
    answers = [complete(client, "pirate") for _ in range(4)]
    holders = {replica["replica"] for replica in status(fleet)["replicas"] if "pirate@2" in replica["holds"]}
    assert {answer[1] for answer in answers} == {"pirate@2"} and len({answer[2] for answer in answers}) == 1
    assert {answer[2] for answer in answers} <= holders


def scrape(fleet) -> tuple[str, dict[tuple[str, str, str], float]]:
    """The ingress's /metrics, and its loraflow_* samples as {(sample name, version, replica): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(fleet["url"] + "/metrics", timeout=60).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if "le" not in sample.labels:
                samples[sample.name, sample.labels["version"], sample.labels["replica"]] = sample.value
    return text, samples


def test_metrics_on_the_ingress_carry_each_replicas_series(fleet, client):
    replicas = {replica["replica"] for replica in status(fleet)["replicas"]}
    _, before = scrape(fleet)
    answered, tokens = set(), 0
    for _ in range(3):
        raw = client.completions.with_raw_response.create(
            model="other", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0
        )
        answered.add(raw.headers["x-loraflow-replica"])
        tokens += raw.parse().usage.completion_tokens
    (replica,) = answered  # other@1 stays on the replica that holds it
    text, after = scrape(fleet)
    type_lines = [line for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(type_lines) == len(set(type_lines)), "a family's HELP and TYPE appear once, whatever the replicas"
    assert {key[2] for key in after} <= replicas and replica in {key[2] for key in after}

    def grew(name: str, on: str) -> float:
        return after.get((name, "other@1", on), 0) - before.get((name, "other@1", on), 0)

    assert grew("loraflow_requests_total", replica) == 3
    assert grew("loraflow_generated_tokens_total", replica) == tokens > 0
    assert grew("loraflow_time_to_first_token_seconds_count", replica) == 3
    assert grew("loraflow_request_errors_total", replica) == 0
    assert after[("loraflow_adapter_resident", "other@1", replica)] == 1
    for other in replicas - {replica}:
        assert grew("loraflow_requests_total", other) == 0


def test_a_canary_splits_the_fleets_requests_and_a_prompt_version_is_served(fleet, client, setup):
    from concurrent.futures import ThreadPoolExecutor

    registry, base = setup["registry"], setup["base"]
    for seed in (21, 22):
        registry.publish(
            make_adapter(base, setup["base"].path.parent / f"canary{seed}", seed=seed), "canary", base=base
        )
    registry.start_canary("canary@2", 10)

    def one(_):
        raw = client.completions.with_raw_response.create(model="canary", prompt=PROMPT, max_tokens=1)
        return raw.parse().model, raw.headers.get("x-loraflow-version")

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(2000)))
    assert all(named == header for named, header in answers), "the header and the model field disagree"
    share = sum(named == "canary@2" for named, _ in answers) / len(answers)
    assert abs(share - 0.10) <= 0.03, f"the canary answered {share:.1%} of 2,000 requests, not 10% +- 3 points"
    run_loraflow("--registry", str(registry.path), "promote", "canary@2", "--api-key", API_KEY)
    assert {complete(client, "canary")[0] for _ in range(20)} == {"canary@2"}, "a promote ends the canary"

    registry.publish_prompt("Answer in one word.", "brief", base=base)
    raw = client.chat.completions.with_raw_response.create(
        model="brief", messages=[{"role": "user", "content": PROMPT}], max_tokens=MAX_TOKENS, temperature=0
    )
    assert raw.parse().model == raw.headers["x-loraflow-version"] == "brief@1"


class Traffic:
    """Clients asking for `model` in a loop; each answer is kept with the time its request started."""

    def __init__(self, client, model: str = "pirate", clients: int = 4, streaming: int = 0):
        self.client = client
        self.model = model
        self.answers: list[tuple[float, str, str, str]] = []  # (start, version, replica, text)
        self.failures: list[tuple[float, BaseException]] = []  # (start, error)
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._keep_asking, args=(number < streaming,)) for number in range(clients)
        ]

    def _keep_asking(self, stream: bool):
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                named, version, replica, text = complete(self.client, self.model, stream)
                assert named == version, f"the body names {named}, the header {version}"
                self.answers.append((started, named, replica, text))
            except BaseException as error:  # every failure counts, whatever its type
                self.failures.append((started, error))

    def wait_for(self, count: int, after: float, ref: str | None = None, timeout_s: float = 120) -> None:
        """Until `count` answers (from `ref`, if given) to requests started after `after`."""
        deadline = time.monotonic() + timeout_s
        while sum(start > after and ref in (None, named) for start, named, _, _ in self.answers) < count:
            assert time.monotonic() < deadline, f"fewer than {count} answers from {ref or 'any version'} in time"
            self.stop.wait(0.05)

    def __enter__(self) -> "Traffic":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()


def test_promote_and_rollback_reach_every_replica_before_they_return(fleet, client, setup):
    """Under load: once `loraflow promote`/`rollback` (or `wait_until_fleet_serves`) returns, no answer as NAME
    comes from the old version, on either replica, and no request fails."""
    from loraflow.serve.fleet_ack import wait_until_fleet_serves

    registry = setup["registry"]
    env = {"LORAFLOW_API_KEY": API_KEY}
    references = {ref: complete(client, ref)[3] for ref in ("pirate@1", "pirate@2")}
    acknowledged: list[tuple[float, str]] = []  # (when the command returned, the version NAME means from then on)
    flips = []
    with Traffic(client, clients=4) as traffic:
        traffic.wait_for(4, after=0)
        promoted = run_loraflow("--registry", str(registry.path), "promote", "pirate@1", env=env)
        acknowledged.append((time.monotonic(), "pirate@1"))
        assert re.search(r"fleet http://\S+: every replica \(\S+, \S+\) serves pirate as pirate@1", promoted.stdout)
        traffic.wait_for(8, after=acknowledged[-1][0], ref="pirate@1")
        run_loraflow("--registry", str(registry.path), "rollback", "pirate", "--reason", "test", env=env)
        acknowledged.append((time.monotonic(), "pirate@2"))
        traffic.wait_for(8, after=acknowledged[-1][0], ref="pirate@2")
        for ref in ("pirate@1", "pirate@2") * 3:
            registry.promote(ref, actor="test", reason="flip under load")
            began = time.monotonic()
            wait_until_fleet_serves(fleet["url"], ref, registry.revision, API_KEY, timeout_s=30)
            flips.append(time.monotonic() - began)
            acknowledged.append((time.monotonic(), ref))
            traffic.wait_for(4, after=acknowledged[-1][0], ref=ref)
    assert traffic.failures == []
    for started, named, _, text in traffic.answers:
        assert text == references[named], f"{named} answered {text!r}, its reference is {references[named]!r}"
        done = [ref for when, ref in acknowledged if when < started]
        if done:
            later = {ref for when, ref in acknowledged if when >= started}
            assert named in {done[-1]} | later, f"a request sent after {done[-1]} was acknowledged got {named}"
    print(
        f"\nflip time (promote -> every replica acknowledged) over {len(flips)} flips: "
        f"p50 {statistics.median(flips) * 1000:.0f} ms, max {max(flips) * 1000:.0f} ms; "
        f"{len(traffic.answers)} answers, 0 failed"
    )


def test_a_replica_whose_vllm_is_killed_is_replaced_and_requests_keep_succeeding(fleet, client):
    """kill -9 one replica's vLLM under load: requests sent after the kill succeed (the ingress re-sends those that
    got no answer); only answers already streaming when it died may fail. Ray starts a new replica, and requests
    succeed after that too. The load stops while the new replica starts: on 2 cores it would starve its start."""
    before = status(fleet)["replicas"]
    fleet["pids"] |= {replica["vllm_pid"] for replica in before}
    victim = next(replica for replica in before if "pirate@2" in replica["holds"])
    with Traffic(client, clients=4, streaming=1) as traffic:
        traffic.wait_for(8, after=0)
        killed = time.monotonic()
        os.killpg(victim["vllm_pid"], signal.SIGKILL)  # vLLM's API server, engine and workers: its process group
        traffic.wait_for(16, after=killed)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:  # readiness: two replicas again, the killed one gone
        replicas = status(fleet)["replicas"]
        ids = {replica["replica"] for replica in replicas}
        if len(ids) == 2 and victim["replica"] not in ids:
            break
        assert time.monotonic() < deadline, f"no replacement replica within {START_TIMEOUT_S} s: {replicas}"
        time.sleep(0.5)  # the interval between two status polls
    recovered = time.monotonic()
    fleet["pids"] |= {replica["vllm_pid"] for replica in replicas}
    with Traffic(client, clients=4, streaming=1) as after_recovery:
        after_recovery.wait_for(16, after=0)
    assert after_recovery.failures == []
    in_flight = [error for started, error in traffic.failures if started < killed]
    after_kill = [error for started, error in traffic.failures if started >= killed]
    assert after_kill == [], f"requests sent after the kill failed: {after_kill}"
    assert not process_running(victim["vllm_pid"])
    print(
        f"\nkill -9 of replica {victim['replica']}'s vLLM under load: {len(in_flight)} in-flight request(s) failed "
        f"({', '.join(type(error).__name__ for error in in_flight) or 'none'}), "
        f"{sum(start >= killed for start, *_ in traffic.answers)} sent after it succeeded; "
        f"replaced in {recovered - killed:.0f} s"
    )


def test_a_replica_killed_outright_takes_its_vllm_with_it(fleet):
    """kill -9 of a replica's own process (what Ray does to a replica that does not stop in time): its vLLM, which
    runs in a session of its own, ends with it instead of keeping its memory and port until the fleet stops."""
    replica = status(fleet)["replicas"][0]
    fleet["pids"].add(replica["vllm_pid"])
    os.kill(replica["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 120
    while process_running(replica["vllm_pid"]):
        assert time.monotonic() < deadline, f"vLLM {replica['vllm_pid']} outlived its replica {replica['pid']}"
        time.sleep(0.2)  # the interval between two looks


def test_wait_until_fleet_serves_names_what_lags_behind():
    from loraflow.hub.errors import LoraflowError
    from loraflow.serve.fleet_ack import wait_until_fleet_serves

    answer = {
        "registry": "registry.json",
        "ingress": {"replica": "in1", "revision": 7},
        "serves": {"pirate": "pirate@1"},
        "replicas": [{"replica": "r1", "revision": 7}, {"replica": "r2", "revision": 6}],
    }
    client = httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(200, json=answer)))
    with pytest.raises(LoraflowError, match=r"ingress in1 \(registry revision 7, pirate means pirate@1\); replica r2"):
        wait_until_fleet_serves("http://fleet", "pirate@2", 7, timeout_s=0.2, client=client)
    answer["serves"]["pirate"] = "pirate@2"
    answer["replicas"][1]["revision"] = 8
    assert wait_until_fleet_serves("http://fleet", "pirate@2", 7, client=client).replicas == ["r1", "r2"]


def test_records_of_stopped_fleets_are_skipped(tmp_path):
    from loraflow.serve.fleet_ack import FleetRecord, running_fleets

    registry = tmp_path / "registry.json"
    folder = tmp_path / ".loraflow-fleets"
    folder.mkdir()
    stopped = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (folder / "1.json").write_text(f'{{"url": "http://127.0.0.1:1", "pid": {stopped.stdout.strip()}, "replicas": 2}}')
    (folder / "2.json").write_text(f'{{"url": "http://127.0.0.1:2", "pid": {os.getpid()}, "replicas": 2}}')
    (folder / "3.json").write_text("not json")
    assert running_fleets(registry) == [FleetRecord("http://127.0.0.1:2", os.getpid(), 2)]
