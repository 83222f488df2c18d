"""Dataset repos on `loraflow hub serve`, driven by the real huggingface_hub client and `datasets.load_dataset`.

The server is the real command on 127.0.0.1 with a 4 KB inline limit, so the Parquet file goes through the Git
LFS batch API and the card inline. `load_dataset` runs in a fresh interpreter with HF_ENDPOINT set, as a user
runs it (both libraries read the endpoint once, at import).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import REPO
from tests.hub.hub_server_support import READ_TOKEN, WRITE_TOKEN, HubServer, hub_api

AUTH = {"Authorization": f"Bearer {WRITE_TOKEN}"}
HEADER = {"key": "header", "value": {"summary": "test", "description": ""}}
CARD = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
---
# Pairs
"""

LOAD = """
import json, sys
from datasets import load_dataset
rows = load_dataset(sys.argv[1], split="train", **json.loads(sys.argv[2]))
print(json.dumps({"columns": rows.column_names, "rows": rows.to_list()}))
"""


def load_dataset_through(endpoint: str, repo: str, cache, **options) -> dict:
    """`datasets.load_dataset(repo, split="train")` in a fresh interpreter whose HF_ENDPOINT is the test hub."""
    env = {
        **os.environ,
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(cache),
        "HF_TOKEN": "",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "PYTHONPATH": str(REPO),
    }
    result = subprocess.run(
        [sys.executable, "-c", LOAD, repo, json.dumps(options)], capture_output=True, text=True, env=env, timeout=180
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def write_pairs(folder, count: int):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {
        "prompt": [f"question {i}: " + hashlib.sha512(str(i).encode()).hexdigest() for i in range(count)],
        "chosen": [f"Arr, answer {i}" for i in range(count)],
        "rejected": [f"plain answer {i}" for i in range(count)],
    }
    (folder / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), folder / "data" / "train-00000-of-00001.parquet")
    (folder / "README.md").write_text(CARD)
    return rows


@pytest.fixture(scope="module")
def hub_server(tiny_base, tmp_path_factory):
    with HubServer(tmp_path_factory.mktemp("hub-datasets"), tiny_base.path, "--max-body-mb", "1") as server:
        yield server


@pytest.fixture
def api(hub_server, monkeypatch):
    return hub_api(hub_server, monkeypatch)


@pytest.fixture(scope="module")
def client(hub_server):
    with httpx.Client(base_url=hub_server.endpoint, headers=AUTH, timeout=30) as http:
        yield http


def test_upload_list_download_and_load_dataset(hub_server, api, tmp_path):
    url = api.create_repo("arena/pirate-prefs", repo_type="dataset")
    assert url.endswith("/datasets/arena/pirate-prefs") and url.repo_type == "dataset"
    assert api.create_repo("arena/pirate-prefs", repo_type="dataset", exist_ok=True) == url
    rows = write_pairs(tmp_path / "upload", 40)
    parquet = tmp_path / "upload" / "data" / "train-00000-of-00001.parquet"
    assert parquet.stat().st_size > 4096  # over the inline limit: it travels through the LFS batch API
    first = api.upload_folder(repo_id="arena/pirate-prefs", repo_type="dataset", folder_path=tmp_path / "upload")

    info = api.dataset_info("arena/pirate-prefs", files_metadata=True)
    assert info.sha == first.oid and info.id == "arena/pirate-prefs"
    assert info.card_data.configs[0]["data_files"][0]["split"] == "train"
    siblings = {sibling.rfilename: sibling for sibling in info.siblings}
    assert set(siblings) == {"README.md", "data/train-00000-of-00001.parquet"}
    assert siblings["data/train-00000-of-00001.parquet"].lfs.size == parquet.stat().st_size
    assert siblings["README.md"].lfs is None
    assert sorted(api.list_repo_files("arena/pirate-prefs", repo_type="dataset")) == sorted(siblings)
    top = {entry.path: type(entry).__name__ for entry in api.list_repo_tree("arena/pirate-prefs", repo_type="dataset")}
    assert top == {"README.md": "RepoFile", "data": "RepoFolder"}
    found = api.get_paths_info("arena/pirate-prefs", ["data", "README.md", "missing.txt"], repo_type="dataset")
    assert sorted(entry.path for entry in found) == ["README.md", "data"]

    card = api.hf_hub_download("arena/pirate-prefs", "README.md", repo_type="dataset", cache_dir=tmp_path / "cache")
    assert open(card).read() == CARD
    snapshot = api.snapshot_download("arena/pirate-prefs", repo_type="dataset", cache_dir=tmp_path / "cache")
    assert (tmp_path / "cache").exists() and os.path.getsize(f"{snapshot}/data/train-00000-of-00001.parquet") == (
        parquet.stat().st_size
    )

    loaded = load_dataset_through(hub_server.endpoint, "arena/pirate-prefs", tmp_path / "hf-home")
    assert loaded["columns"] == ["prompt", "chosen", "rejected"]
    assert [row["chosen"] for row in loaded["rows"]] == rows["chosen"]


def test_each_commit_is_a_new_immutable_revision(hub_server, api, tmp_path):
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete
    from huggingface_hub.errors import HfHubHTTPError

    api.create_repo("arena/history", repo_type="dataset")
    initial = api.dataset_info("arena/history").sha
    write_pairs(tmp_path / "v1", 3)
    first = api.upload_folder(repo_id="arena/history", repo_type="dataset", folder_path=tmp_path / "v1").oid
    write_pairs(tmp_path / "v2", 5)
    second = api.create_commit(
        "arena/history",
        repo_type="dataset",
        operations=[
            CommitOperationAdd(
                "data/train-00000-of-00001.parquet", str(tmp_path / "v2/data/train-00000-of-00001.parquet")
            ),
            CommitOperationAdd("notes/extra.txt", b"more"),
        ],
        commit_message="five pairs",
        parent_commit=first,
    ).oid
    assert len({initial, first, second}) == 3
    assert api.dataset_info("arena/history").sha == second
    assert "notes/extra.txt" not in api.list_repo_files("arena/history", repo_type="dataset", revision=first)
    assert api.list_repo_files("arena/history", repo_type="dataset", revision=initial) == []
    old = api.hf_hub_download(
        "arena/history", "data/train-00000-of-00001.parquet", repo_type="dataset", revision=first, cache_dir=tmp_path
    )
    assert open(old, "rb").read() == (tmp_path / "v1/data/train-00000-of-00001.parquet").read_bytes()
    assert [commit.commit_id for commit in api.list_repo_commits("arena/history", repo_type="dataset")] == [
        second,
        first,
        initial,
    ]
    api.create_commit(
        "arena/history", repo_type="dataset", operations=[CommitOperationDelete("notes/")], commit_message="rm"
    )
    assert "notes/extra.txt" not in api.list_repo_files("arena/history", repo_type="dataset")
    assert "notes/extra.txt" in api.list_repo_files("arena/history", repo_type="dataset", revision=second)
    with pytest.raises(HfHubHTTPError) as stale:
        api.create_commit(
            "arena/history",
            repo_type="dataset",
            operations=[CommitOperationAdd("x.txt", b"x")],
            commit_message="stale",
            parent_commit=first,
        )
    assert stale.value.response.status_code == 412
    store = hub_server.root / "datasets" / "arena" / "history"
    assert sorted(path.name for path in (store / "revisions").iterdir()) == sorted(
        commit.commit_id for commit in api.list_repo_commits("arena/history", repo_type="dataset")
    )
    assert not list(store.glob(".staging-*"))


def test_reads_are_public_and_writes_need_a_write_token(hub_server, api, tmp_path):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api.create_repo("arena/guarded", repo_type="dataset")
    anonymous = HfApi(endpoint=hub_server.endpoint, token=False)
    assert anonymous.dataset_info("arena/guarded").sha
    for token, status in ((False, 401), (READ_TOKEN, 403)):
        with pytest.raises(HfHubHTTPError) as refused:
            HfApi(endpoint=hub_server.endpoint, token=token).upload_file(
                path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="arena/guarded", repo_type="dataset"
            )
        assert refused.value.response.status_code == status
    assert api.list_repo_files("arena/guarded", repo_type="dataset") == []


def test_missing_repos_revisions_and_files_are_the_errors_huggingface_hub_knows(hub_server, api, tmp_path):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    with pytest.raises(RepositoryNotFoundError):
        api.dataset_info("arena/nothing-here")
    with pytest.raises(RepositoryNotFoundError):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="arena/nothing-here", repo_type="dataset")
    api.create_repo("arena/sparse", repo_type="dataset")
    with pytest.raises(RevisionNotFoundError):
        api.dataset_info("arena/sparse", revision="v2")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(
            "arena/sparse", "nope.txt", repo_type="dataset", endpoint=hub_server.endpoint, cache_dir=tmp_path
        )
    assert not (hub_server.root / "datasets" / "arena" / "nothing-here").exists()


def _ndjson(*lines) -> bytes:
    return b"\n".join(line if isinstance(line, bytes) else json.dumps(line).encode() for line in lines)


def _file(path: str, data: bytes = b"x") -> dict:
    return {"key": "file", "value": {"path": path, "content": base64.b64encode(data).decode()}}


def _refused(response: httpx.Response, status: int, *words: str) -> None:
    message = response.json()["error"]
    assert response.status_code == status, (response.status_code, message)
    assert response.headers["x-error-message"] and "Traceback" not in response.text
    for word in words:
        assert word in message, message


@pytest.fixture(scope="module")
def bad_input_repo(client):
    response = client.post("/api/repos/create", json={"name": "bad", "organization": "arena", "type": "dataset"})
    assert response.status_code == 200, response.text
    assert client.post(
        "/api/datasets/arena/bad/commit/main", content=_ndjson(HEADER, _file("a/b.txt"), _file("top.txt"))
    ).is_success
    return "/api/datasets/arena/bad"


@pytest.mark.parametrize(
    "body, status, words",
    [
        (b"", 400, ["empty"]),
        (b"not json", 400, ["line 1", "not valid JSON"]),
        (_ndjson(_file("x.txt")), 400, ["header"]),
        (_ndjson(HEADER, {"key": "file", "value": {"path": "x", "content": 5}}), 400, ["line 2"]),
        (_ndjson(HEADER, {"key": "file", "value": {"path": "x", "content": "%%%"}}), 400, ["base64"]),
        (_ndjson(HEADER, _file("../escape.txt")), 400, ["'..'"]),
        (_ndjson(HEADER, _file("/etc/passwd")), 400, ["relative path"]),
        (_ndjson(HEADER, _file("a")), 422, ["a"]),
        (_ndjson(HEADER, _file("top.txt/under")), 422, ["top.txt/under"]),
        (_ndjson(HEADER, _file("x" * 1200)), 422, ["1000 characters"]),
        (_ndjson(HEADER, {"key": "deletedFile", "value": {"path": "missing.txt"}}), 404, ["doesn't exist"]),
        (
            _ndjson(HEADER, {"key": "lfsFile", "value": {"path": "x", "algo": "sha256", "oid": "0" * 64}}),
            422,
            ["never"],
        ),
        (_ndjson(HEADER, {"key": "lfsFile", "value": {"path": "x", "algo": "sha256", "oid": "xyz"}}), 400, ["sha256"]),
        (_ndjson({"key": "header", "value": {"summary": "s", "parentCommit": "f" * 40}}), 412, ["parent commit"]),
    ],
)
def test_bad_commits_are_refused_with_a_4xx_and_change_nothing(client, bad_input_repo, body, status, words):
    before = client.get(f"{bad_input_repo}/revision/main").json()["sha"]
    _refused(client.post(f"{bad_input_repo}/commit/main", content=body), status, *words)
    assert client.get(f"{bad_input_repo}/revision/main").json()["sha"] == before


def test_bad_names_revisions_and_requests_are_4xx(client, bad_input_repo, hub_server):
    create = {"name": "Upper", "organization": "arena", "type": "dataset"}
    _refused(client.post("/api/repos/create", json=create), 400, "lowercase", "arena/upper")
    _refused(client.post("/api/repos/create", json={"name": "x", "type": "dataset"}), 400, "organization")
    _refused(client.post("/api/repos/create", json={"name": "x", "type": "space"}), 400, "'space'")
    _refused(client.get("/api/datasets/Arena/bad"), 400, "lowercase")
    _refused(client.post(f"{bad_input_repo}/commit/dev", content=_ndjson(HEADER)), 404, "main")
    _refused(client.post(f"{bad_input_repo}/commit/main?create_pr=1", content=_ndjson(HEADER)), 400, "pull requests")
    _refused(client.get(f"{bad_input_repo}/tree/main/nowhere"), 404, "nowhere")
    _refused(client.get("/datasets/arena/bad/resolve/main/..%2F..%2Fregistry.json"), 400, "'..'")
    _refused(client.post(f"{bad_input_repo}/paths-info/main", content=b""), 400, "paths")
    _refused(client.post(f"{bad_input_repo}/paths-info/main", content=b"\xff\xfe"), 400, "form")
    _refused(client.post(f"{bad_input_repo}/preupload/main", json={"files": "x"}), 400, "files")
    _refused(client.post(f"{bad_input_repo}/commit/main", content=b"x" * (1024 * 1024 + 1)), 413, "body")
    batch = {"operation": "download", "objects": []}
    _refused(client.post("/datasets/arena/bad.git/info/lfs/objects/batch", json=batch), 400, "uploads only")
    _refused(client.post("/api/datasets/arena/bad/xet-write-token/main"), 501, "HF_HUB_DISABLE_XET")
    arena = hub_server.root / "datasets" / "arena"
    assert not any(
        (folder / name).exists() for folder in (arena, arena.parent / "Arena") for name in ("upper", "Upper")
    )


_operation = st.fixed_dictionaries(
    {"key": st.sampled_from(["file", "lfsFile", "deletedFile", "deletedFolder", "other"])},
    optional={
        "value": st.fixed_dictionaries(
            {},
            optional={
                "path": st.sampled_from(["a", "a/b", "data/x.parquet", "", ".", "a/../b"]) | st.text(max_size=12),
                "content": st.sampled_from(["eA==", "", "!!"]) | st.integers(),
                "oid": st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
            },
        )
    },
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(operations=st.lists(_operation, max_size=4), with_header=st.booleans())
def test_random_commits_never_make_a_500(client, bad_input_repo, operations, with_header):
    body = _ndjson(*([HEADER] if with_header else []), *operations)
    response = client.post(f"{bad_input_repo}/commit/main", content=body)
    assert response.status_code < 500, response.text


def test_a_private_hub_needs_a_token_to_read_datasets(tmp_path, tiny_base):
    from fastapi.testclient import TestClient

    from loraflow.hub.hub_server import HubAccess, create_app
    from loraflow.hub.registry import Registry

    access = HubAccess(frozenset({WRITE_TOKEN}), frozenset({READ_TOKEN}), private=True)
    app = create_app(Registry(tmp_path / "registry.json"), tiny_base, access)
    with TestClient(app) as http:
        create = {"name": "secret", "organization": "arena", "type": "dataset"}
        assert http.post("/api/repos/create", json=create, headers=AUTH).status_code == 200
        _refused(http.get("/api/datasets/arena/secret"), 401, "private")
        _refused(http.get("/datasets/arena/secret/resolve/main/README.md"), 401, "private")
        reader = {"Authorization": f"Bearer {READ_TOKEN}"}
        assert http.get("/api/datasets/arena/secret", headers=reader).json()["private"] is True
    assert (tmp_path / "datasets" / "arena" / "secret" / "repo.json").is_file()
