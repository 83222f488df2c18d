"""`loraflow hub serve` given bad input: every refusal is a 4xx whose message names the problem, never a 500.

The server runs as the real command with a 1 MiB body limit, so the size limits are cheap to reach.
"""

from __future__ import annotations

import base64
import hashlib
import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraflow.hub.registry import Registry
from tests.hub.hub_server_support import WRITE_TOKEN, HubServer

AUTH = {"Authorization": f"Bearer {WRITE_TOKEN}"}
HEADER = {"key": "header", "value": {"summary": "test", "description": ""}}
# One body with a wrong type for a field of each JSON endpoint (create, preupload, LFS batch, branch, tag, YAML).
WRONG_TYPES = {"name": 5, "files": "x", "objects": [{"oid": 1}], "startingPoint": 3, "tag": [], "content": 1}


@pytest.fixture(scope="module")
def hub_server(tiny_base, tmp_path_factory):
    server = HubServer(tmp_path_factory.mktemp("hub-bad-input"), tiny_base.path, "--max-body-mb", "1")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(hub_server):
    with httpx.Client(base_url=hub_server.endpoint, headers=AUTH, timeout=30) as http:
        yield http


def _ndjson(*lines) -> bytes:
    return b"\n".join(line if isinstance(line, bytes) else json.dumps(line).encode() for line in lines)


def _refused(response: httpx.Response, status: int, *words: str) -> str:
    message = response.json()["error"]
    assert response.status_code == status, (response.status_code, message)
    assert response.headers["x-error-message"]
    for word in words:
        assert word in message, message
    assert "Traceback" not in response.text
    return message


def _commit(client: httpx.Client, body: bytes, repo: str = "loraflow/bad", revision: str = "main") -> httpx.Response:
    return client.post(f"/api/models/{repo}/commit/{revision}", content=body)


@pytest.mark.parametrize(
    "body, words",
    [
        (b"", ["empty"]),
        (_ndjson(HEADER, b"{not json"), ["line 2", "not valid JSON"]),
        (_ndjson(HEADER, b"\xff\xfe\x00"), ["line 2", "not valid JSON"]),
        (_ndjson(HEADER, [1, 2]), ["line 2", "list", "not an object"]),
        (_ndjson(HEADER, "file"), ["line 2", "str", "not an object"]),
        (_ndjson({"key": "file", "value": {"path": "a.json", "content": ""}}), ["line 1", "header"]),
        (_ndjson([HEADER]), ["line 1", "header"]),
        (b"[" * 100_000, ["line 1", "not valid JSON"]),
    ],
)
def test_a_malformed_commit_body_is_a_400(client, hub_server, body, words):
    revision = hub_server.registry.revision
    _refused(_commit(client, body), 400, *words)
    assert hub_server.registry.revision == revision


@pytest.mark.parametrize(
    "operation, words",
    [
        ({"key": "file", "value": {"path": "a.json", "content": 12}}, ["value.content", "string"]),
        ({"key": "file", "value": {"path": 5, "content": "", "encoding": "base64"}}, ["value.path", "string"]),
        ({"key": "file", "value": {"content": ""}}, ["value.path", "required"]),
        ({"key": "file", "value": {"path": "a.json", "content": "", "mode": "755"}}, ["value.mode", "not permitted"]),
        ({"key": "file", "value": {"path": "a.json", "content": "%%%"}}, ["a.json", "base64"]),
        ({"key": "file", "value": {"path": "a.json", "content": "", "encoding": "hex"}}, ["value.encoding"]),
        ({"key": "lfsFile", "value": {"path": "w.safetensors", "algo": "sha256", "oid": 7}}, ["value.oid", "string"]),
        ({"key": "lfsFile", "value": {"path": "w.safetensors", "oid": "abc"}}, ["oid", "sha256"]),
        ({"key": "deletedFile", "value": {"path": "../../etc/passwd"}}, ["'..'"]),
        ({"key": "deletedFile", "value": {"path": "a\x00b"}}, ["not allowed"]),
        ({"key": "copyFile", "value": {"path": "a.json"}}, ["copyFile"]),
        ({"value": {"path": "a.json"}}, ["key"]),
        ({"key": "file"}, ["value", "required"]),
        ({"key": "file", "value": "a.json"}, ["value"]),
    ],
)
def test_a_commit_operation_of_the_wrong_shape_is_a_400_before_anything_is_applied(
    client, hub_server, tiny_adapter, operation, words
):
    revision = hub_server.registry.revision
    config = base64.b64encode((tiny_adapter / "adapter_config.json").read_bytes()).decode()
    valid = {"key": "file", "value": {"path": "adapter_config.json", "content": config, "encoding": "base64"}}
    message = _refused(_commit(client, _ndjson(HEADER, valid, operation)), 400, "line 3", *words)
    assert "line 2" not in message  # the valid operation before it is fine; the broken one is named
    assert hub_server.registry.revision == revision


def test_a_header_of_the_wrong_shape_is_a_400(client):
    header = {"key": "header", "value": {"summary": 3}}
    _refused(_commit(client, _ndjson(header)), 400, "line 1", "value.summary")


@pytest.mark.parametrize(
    "path",
    [
        "/api/repos/create",
        "/api/models/loraflow/bad/preupload/main",
        "/loraflow/bad.git/info/lfs/objects/batch",
        "/api/models/loraflow/bad/branch/staging",
        "/api/models/loraflow/bad/tag/main",
        "/api/validate-yaml",
    ],
)
@pytest.mark.parametrize(
    "body",
    [b"{not json", b"[1, 2]", b"\xff\xfe", json.dumps(WRONG_TYPES).encode()],
)
def test_a_json_body_that_is_not_what_the_endpoint_takes_is_a_400(client, path, body):
    _refused(client.post(path, content=body, headers={"Content-Type": "application/json"}), 400, "bad JSON body")


def test_wrong_types_in_json_bodies_name_the_field(client):
    preupload = {"files": [{"path": "a", "size": -1}]}
    response = client.post("/api/models/loraflow/bad/preupload/main", json=preupload)
    _refused(response, 400, "files.0.size")
    batch = {"operation": "upload", "objects": [{"oid": 1, "size": 1}]}
    _refused(client.post("/loraflow/bad.git/info/lfs/objects/batch", json=batch), 400, "objects.0.oid")


def test_a_query_parameter_of_the_wrong_type_is_a_400(client):
    params = {"size": "big", "expires": 1, "signature": "x"}
    _refused(client.put("/api/loraflow/lfs/" + "0" * 64, params=params), 400, "size")


def test_headers_over_16_kib_are_a_431(hub_server):
    response = httpx.get(f"{hub_server.endpoint}/api/loraflow/health", headers={"X-Padding": "a" * 20_000})
    _refused(response, 431, "headers", "16384")
    padded = httpx.get(f"{hub_server.endpoint}/api/loraflow/health", headers={"X-Padding": "a" * 8_000})
    assert padded.status_code == 200


def test_a_body_over_the_limit_is_a_413_declared_or_streamed(client, hub_server):
    revision = hub_server.registry.revision
    oversized = b"x" * (1024 * 1024 + 1)
    _refused(_commit(client, oversized), 413, "--max-body-mb")

    def chunks():  # no Content-Length: the server counts as the body arrives
        for _ in range(5):
            yield b"y" * (300 * 1024)

    _refused(_commit(client, chunks()), 413, "--max-body-mb")
    _refused(client.post("/api/repos/create", content=oversized), 413)
    assert hub_server.registry.revision == revision


def test_an_lfs_upload_takes_only_the_size_it_was_signed_for(client):
    data = b"0123456789"
    oid = hashlib.sha256(data).hexdigest()
    batch = client.post(
        "/loraflow/bad.git/info/lfs/objects/batch",
        json={"operation": "upload", "transfers": ["basic"], "objects": [{"oid": oid, "size": len(data)}]},
    )
    href = batch.json()["objects"][0]["actions"]["upload"]["href"]
    _refused(httpx.put(href, content=data * 2), 413, f"takes {len(data)} bytes")

    def longer():
        yield data
        yield data

    _refused(httpx.put(href, content=longer()), 413, f"takes {len(data)} bytes")
    assert httpx.put(href, content=data).status_code == 200


def test_an_uppercase_repo_name_says_names_are_lowercase(hub_server, tiny_adapter, monkeypatch):
    import huggingface_hub.constants
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    api = HfApi(endpoint=hub_server.endpoint, token=WRITE_TOKEN)
    for action in (
        lambda: api.upload_folder(repo_id="loraflow/Upper", folder_path=tiny_adapter),
        lambda: api.create_repo("loraflow/Upper"),
        lambda: api.model_info("loraflow/Upper"),
    ):
        with pytest.raises(HfHubHTTPError) as refused:
            action()
        assert refused.value.response.status_code == 400
        message = refused.value.server_message
        assert "lowercase" in message and "1-64" in message and "loraflow/upper" in message
    assert "upper" not in hub_server.registry.names()


def test_an_unexpected_error_is_a_500_without_internals(tmp_path, tiny_base):
    from fastapi.testclient import TestClient

    from loraflow.hub.hub_server import HubAccess, create_app

    app = create_app(Registry(tmp_path / "registry.json"), tiny_base, HubAccess(frozenset({WRITE_TOKEN}), frozenset()))

    def broken():
        raise RuntimeError("secret host detail")

    app.state.repos.snapshot = broken
    with TestClient(app, raise_server_exceptions=False) as http:
        response = http.get("/api/loraflow/registry")
    assert response.status_code == 500
    assert "RuntimeError" in response.json()["error"]
    assert "secret host detail" not in response.text and "Traceback" not in response.text


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=16,
)
_operation = st.fixed_dictionaries(
    {"key": st.sampled_from(["header", "file", "lfsFile", "deletedFile", "deletedFolder", "other"]) | _json},
    optional={"value": st.dictionaries(st.sampled_from(["path", "content", "oid", "encoding", "summary", "x"]), _json)},
)
_path = st.sampled_from(["adapter_config.json", "adapter_model.safetensors", "README.md", "a/b", "a"]) | st.text(
    max_size=20
)
# Operations of the right shape with odd contents, so the fuzzing reaches the staging folder and the publish checks.
_well_formed_operation = st.one_of(
    st.builds(
        lambda path, data: {"key": "file", "value": {"path": path, "content": base64.b64encode(data).decode()}},
        _path,
        st.binary(max_size=64) | st.just(b"{}") | st.just(b'{"peft_type": "LORA", "r": -1}'),
    ),
    st.builds(lambda path: {"key": "deletedFile", "value": {"path": path}}, _path),
    st.builds(lambda path: {"key": "deletedFolder", "value": {"path": path}}, _path),
    st.builds(
        lambda path, oid: {"key": "lfsFile", "value": {"path": path, "algo": "sha256", "oid": oid}},
        _path,
        st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
    ),
)
_revision = st.sampled_from(["main", "v1", "v7", "staging", "0" * 40])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.binary(max_size=512), revision=_revision)
def test_random_bytes_to_the_commit_endpoint_never_make_a_500(client, hub_server, body, revision):
    response = _commit(client, body, "loraflow/fuzz", revision)
    assert response.status_code < 500, response.text
    assert "fuzz" not in Registry(hub_server.registry.path).snapshot().names()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lines=st.lists(_well_formed_operation | _operation | _json, max_size=5),
    with_header=st.booleans(),
    revision=_revision,
)
def test_random_json_to_the_commit_endpoint_never_makes_a_500(client, hub_server, lines, with_header, revision):
    body = _ndjson(*([HEADER] if with_header else []), *lines)
    response = _commit(client, body, "loraflow/fuzz", revision)
    assert response.status_code < 500, response.text
    assert "fuzz" not in Registry(hub_server.registry.path).snapshot().names()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations=st.lists(_well_formed_operation, max_size=5), revision=_revision)
def test_well_formed_commits_of_odd_files_never_make_a_500(client, hub_server, operations, revision):
    response = _commit(client, _ndjson(HEADER, *operations), "loraflow/fuzz", revision)
    assert response.status_code < 500, response.text
    assert "fuzz" not in Registry(hub_server.registry.path).snapshot().names()
