"""Serving replicas that read the registry by URL from `loraflow hub serve`, as on other machines.

The hub runs as the real `loraflow hub serve` command; adapters reach it through the real huggingface_hub
client (`HfApi.upload_folder`); the replica is the real vLLM server with LORAFLOW_REGISTRY set to the hub's URL,
queried with the official openai client. The replica shares no files with the hub: it downloads into its own cache.
"""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from loraflow.hub.errors import LoraflowError
from tests.conftest import make_adapter, write_tiny_llama
from tests.hub.hub_server_support import READ_TOKEN, HubServer, hub_api

API_KEY = "test-key"
PROMPT = "Tell me about the sea"


@pytest.fixture(scope="module")
def base(smollm2, tmp_path_factory):
    return write_tiny_llama(smollm2, tmp_path_factory.mktemp("remote-base") / "tiny-base", seed=0)


@pytest.fixture(scope="module")
def hub(base, tmp_path_factory):
    with HubServer(tmp_path_factory.mktemp("remote-hub"), base.path) as server:
        yield server


@pytest.fixture(scope="module")
def api(hub):
    with pytest.MonkeyPatch.context() as patch:
        yield hub_api(hub, patch)


def upload(api, base, folder, name: str, seed: int) -> None:
    api.upload_folder(repo_id=f"loraflow/{name}", folder_path=make_adapter(base, folder, seed=seed))


def wait_until(condition, what: str, timeout_s: float = 30) -> None:
    """Poll a condition (each poll is an HTTP round trip); fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout_s} s"
        threading.Event().wait(0.05)


def test_metadata_route_answers_304_until_a_publish(hub, base, tmp_path):
    first = httpx.get(f"{hub.endpoint}/api/loraflow/registry")
    assert first.status_code == 200
    etag = first.headers["etag"]
    assert httpx.get(f"{hub.endpoint}/api/loraflow/registry", headers={"If-None-Match": etag}).status_code == 304
    hub.registry.publish(make_adapter(base, tmp_path / "etag", seed=11), "etag", base=base)
    changed = httpx.get(f"{hub.endpoint}/api/loraflow/registry", headers={"If-None-Match": etag})
    assert changed.status_code == 200
    assert "etag" in changed.json()["adapters"]


def live_ref(view, name: str) -> str | None:
    from loraflow.serve.naming import servable

    version = servable(view.snapshot(), name)
    return version.ref if version else None


def test_remote_view_mirrors_publishes_and_checks_downloads(hub, base, tmp_path):
    from loraflow.serve.naming import check_servable
    from loraflow.serve.remote_registry import RemoteRegistry

    hub.registry.publish(make_adapter(base, tmp_path / "m1", seed=12), "mirror", base=base)
    view = RemoteRegistry(hub.endpoint, poll_s=0.05, cache_dir=tmp_path / "cache")
    try:
        assert live_ref(view, "mirror") == "mirror@1"
        hub.registry.publish(make_adapter(base, tmp_path / "m2", seed=13), "mirror", base=base)
        wait_until(lambda: view.snapshot().find("mirror@2") is not None, "the poller did not notice mirror@2")
        assert live_ref(view, "mirror") == "mirror@1", "a candidate does not change what NAME means"
        hub.registry.promote("mirror@2", actor="test")
        wait_until(lambda: live_ref(view, "mirror") == "mirror@2", "the poller did not notice the promotion")

        version = view.snapshot().resolve("mirror@2")
        folder = view.folder(version)
        assert folder.resolve().is_relative_to(view.store.resolve())
        check_servable(version, folder, view.store, base.fingerprint, 64)
        (folder / "adapter_model.safetensors").resolve().write_bytes(b"tampered")
        with pytest.raises(LoraflowError, match="sha256"):
            check_servable(version, folder, view.store, base.fingerprint, 64)
    finally:
        view.stopped.set()


def test_remote_view_errors_say_what_to_do_and_outlive_the_hub(base, tmp_path):
    from loraflow.hub.registry import Registry
    from loraflow.serve.remote_registry import RemoteRegistry

    with pytest.raises(LoraflowError, match="cannot reach it"):
        RemoteRegistry("http://127.0.0.1:9", poll_s=0).snapshot()
    private = HubServer(tmp_path, base.path, "--private")
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("HF_TOKEN", "")
            with pytest.raises(LoraflowError, match="HF_TOKEN"):
                RemoteRegistry(private.endpoint, poll_s=0).snapshot()
            patch.setenv("HF_TOKEN", READ_TOKEN)
            assert RemoteRegistry(private.endpoint, poll_s=0).snapshot().names() == []
            private.registry.publish(make_adapter(base, tmp_path / "kept", seed=14), "kept", base=base)
            view = RemoteRegistry(private.endpoint, poll_s=0.05, cache_dir=tmp_path / "cache")
            assert live_ref(view, "kept") == "kept@1"
    finally:
        private.stop()
    try:
        wait_until(lambda: not view.reachable, "the poller did not notice the hub going away")
        assert live_ref(view, "kept") == "kept@1", "a replica keeps serving the registry as last mirrored"
    finally:
        view.stopped.set()
    with pytest.raises(LoraflowError, match="loraflow push"):
        Registry("http://127.0.0.1:9")


@pytest.fixture(scope="module")
def replica(hub, api, base, tmp_path_factory):
    """A vLLM server whose registry is the hub's URL, started after pirate@1 was uploaded."""
    from loraflow.serve.launcher import start_server

    upload(api, base, tmp_path_factory.mktemp("src") / "p1", "pirate", seed=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORAFLOW_CACHE", str(tmp_path_factory.mktemp("replica-cache")))
        patch.setenv("LORAFLOW_REGISTRY_POLL_S", "0.2")
        server = start_server(hub.endpoint, base, api_key=API_KEY, max_model_len=256)
    with server:
        yield server.wait_ready()


def complete(replica, model: str):
    client = openai.OpenAI(base_url=replica.url, api_key=API_KEY, max_retries=0, timeout=60)
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0)


def test_replica_serves_and_hot_swaps_adapters_uploaded_to_the_hub(replica, hub, api, base, tmp_path):
    assert replica.settings.registry == hub.endpoint
    first = complete(replica, "pirate")
    assert first.model == "pirate@1"
    assert first.choices[0].text != complete(replica, replica.base_name).choices[0].text

    upload(api, base, tmp_path / "p2", "pirate", seed=2)  # a commit to main: the hub publishes and promotes pirate@2
    wait_until(lambda: complete(replica, "pirate").model == "pirate@2", "the replica did not serve pirate@2")
    assert complete(replica, "pirate").choices[0].text != first.choices[0].text
    assert complete(replica, "pirate@1").choices[0].text == first.choices[0].text

    upload(api, base, tmp_path / "late", "late", seed=3)  # a name the replica has never heard of
    wait_until(
        lambda: "late" in {m.id for m in openai.OpenAI(base_url=replica.url, api_key=API_KEY).models.list().data},
        "the replica did not list `late`",
    )
    assert complete(replica, "late").model == "late@1"

    with pytest.raises(openai.NotFoundError, match=r"versions: pirate@1 \(retired\), pirate@2 \(live\)"):
        complete(replica, "pirate@7")
    state = httpx.get(f"{replica.url}/loraflow/adapters", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert state["registry"] == hub.endpoint
    assert {"pirate@1", "pirate@2", "late@1"} <= {entry["model"] for entry in state["adapters"] if entry["loaded"]}
