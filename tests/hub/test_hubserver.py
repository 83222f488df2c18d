"""`loraflow hub serve` driven over HTTP by the real huggingface_hub client, PEFT, vLLM's Hub LoRA resolver
and the loraflow CLI (`push`, `pull`).

The server runs as the real `loraflow hub serve` command on 127.0.0.1. Its inline limit is set low, so the
adapter weights go through the Git LFS batch API while the small files go inline in the commit: both upload
paths are exercised.

vLLM's Hub resolver class is driven directly here; a running vLLM replica that reads this server by URL is
tested in tests/serve/test_serve_remote.py.

What these tests do not cover of huggingface.co's behaviour:
- the Xet storage protocol (the server answers Xet requests with 501; clients set HF_HUB_DISABLE_XET=1 for
  files above the inline limit) and multipart LFS transfers;
- git access (clone, push), pull requests, discussions, gated repos, organisations and user accounts,
  repo settings, deletion of repos, Space repos, commit history of model repos (list_repo_commits);
  dataset repos are tested in test_hub_datasets.py;
- redirects of LFS downloads to a CDN, and the real Hub's rate limits and error texts beyond the headers
  huggingface_hub parses (X-Error-Code, X-Error-Message).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from loraflow.hub.adapters import sha256_file
from loraflow.hub.registry import Registry
from tests.conftest import REPO, make_adapter, run_loraflow
from tests.hub.hub_server_support import READ_TOKEN, WRITE_TOKEN, HubServer, hub_api


@pytest.fixture(scope="module")
def hub_server(tiny_base, tmp_path_factory):
    with HubServer(tmp_path_factory.mktemp("hub-server"), tiny_base.path) as server:
        yield server


@pytest.fixture
def api(hub_server, monkeypatch):
    return hub_api(hub_server, monkeypatch)


def _client_env(hub_server, token: str | None = WRITE_TOKEN) -> dict:
    """What a user sets: the endpoint and the token. `loraflow push` turns Xet off itself for a loraflow hub."""
    return {"HF_ENDPOINT": hub_server.endpoint, "HF_TOKEN": token or "", "HF_HUB_DISABLE_TELEMETRY": "1"}


def _http_status(error) -> int:
    return error.value.response.status_code


def test_upload_folder_then_info_listing_and_snapshot_download(hub_server, api, tiny_adapter, tmp_path):
    from huggingface_hub import hf_hub_download, snapshot_download

    repo = api.create_repo("loraflow/parrot")
    assert repo.endswith("/loraflow/parrot")
    commit = api.upload_folder(repo_id="loraflow/parrot", folder_path=tiny_adapter, commit_message="first")
    version = hub_server.registry.get("parrot@1")
    assert version.provenance["source"] == "hub-upload"
    assert version.files["adapter_model.safetensors"] == sha256_file(tiny_adapter / "adapter_model.safetensors")

    info = api.model_info("loraflow/parrot", files_metadata=True)
    assert info.sha == commit.oid
    siblings = {s.rfilename: s for s in info.siblings}
    assert set(siblings) == set(version.files)
    assert siblings["adapter_model.safetensors"].lfs.sha256 == version.files["adapter_model.safetensors"]
    assert siblings["adapter_config.json"].lfs is None
    assert sorted(api.list_repo_files("loraflow/parrot")) == sorted(version.files)

    download = Path(
        snapshot_download("loraflow/parrot", endpoint=hub_server.endpoint, cache_dir=tmp_path / "cache", token=False)
    )
    for relative in version.files:
        assert (download / relative).read_bytes() == (tiny_adapter / relative).read_bytes()

    # A commit to main holds only what changed; the new version keeps the rest, is promoted, and v1 stays as it was.
    api.upload_file(path_or_fileobj=b"# parrot\n", path_in_repo="README.md", repo_id="loraflow/parrot")
    second = hub_server.registry.get("parrot")
    assert second.version == 2 and set(second.files) == set(version.files) | {"README.md"}
    assert second.state == "live" and hub_server.registry.get("parrot@1").state == "retired"
    assert api.model_info("loraflow/parrot", revision="v1").sha == commit.oid
    readme = hf_hub_download(
        "loraflow/parrot", "README.md", revision="main", endpoint=hub_server.endpoint, cache_dir=tmp_path / "cache"
    )
    assert Path(readme).read_text() == "# parrot\n"
    refs = api.list_repo_refs("loraflow/parrot")
    assert {ref.name for ref in refs.branches} >= {"main", "v1", "v2"}


def test_a_default_client_needs_no_xet_setting_below_the_inline_limit(hub_server, tiny_adapter, monkeypatch):
    import huggingface_hub.constants
    from huggingface_hub import HfApi
    from huggingface_hub.utils._runtime import is_xet_available

    client = HfApi(endpoint=hub_server.endpoint, token=WRITE_TOKEN)
    with monkeypatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
        client.upload_folder(repo_id="loraflow/plain", folder_path=tiny_adapter)
    assert is_xet_available()
    client.upload_file(path_or_fileobj=b"# plain\n", path_in_repo="NOTES.md", repo_id="loraflow/plain")
    assert {"NOTES.md", "adapter_model.safetensors"} <= set(hub_server.registry.get("plain@2").files)
    with pytest.raises(Exception) as refused:
        client.upload_file(path_or_fileobj=b"x" * 10_000, path_in_repo="big.txt", repo_id="loraflow/plain")
    assert "xet-write-token" in str(refused.value) and "501" in str(refused.value)
    assert hub_server.registry.get("plain@latest").version == 2


def test_download_headers_and_range(hub_server, api, tiny_adapter):
    api.upload_folder(repo_id="loraflow/headers", folder_path=tiny_adapter)
    version = hub_server.registry.get("headers@1")
    url = f"{hub_server.endpoint}/loraflow/headers/resolve/main/adapter_model.safetensors"
    head = httpx.head(url)
    assert head.status_code == 200
    assert head.headers["etag"] == f'"{version.files["adapter_model.safetensors"]}"'
    assert head.headers["x-repo-commit"] == api.model_info("loraflow/headers").sha
    size = (tiny_adapter / "adapter_model.safetensors").stat().st_size
    assert int(head.headers["content-length"]) == size
    part = httpx.get(url, headers={"Range": "bytes=8-15"})
    assert part.status_code == 206
    assert part.content == (tiny_adapter / "adapter_model.safetensors").read_bytes()[8:16]
    missing = httpx.get(f"{hub_server.endpoint}/loraflow/headers/resolve/main/nope.json")
    assert missing.status_code == 404 and missing.headers["x-error-code"] == "EntryNotFound"


def test_writes_need_a_write_token(hub_server, api, tiny_adapter):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    for token, status in ((False, 401), ("hf_not_a_real_token", 401), (READ_TOKEN, 403)):
        client = HfApi(endpoint=hub_server.endpoint, token=token)
        with pytest.raises(HfHubHTTPError) as refused:
            client.create_repo("loraflow/locked")
        assert _http_status(refused) == status
        with pytest.raises(HfHubHTTPError) as refused:
            client.upload_folder(repo_id="loraflow/locked", folder_path=tiny_adapter)
        assert _http_status(refused) == status
    assert "locked" not in hub_server.registry.names()
    # Reads are public on this server: no token needed.
    api.upload_folder(repo_id="loraflow/locked", folder_path=tiny_adapter)
    assert HfApi(endpoint=hub_server.endpoint, token=False).model_info("loraflow/locked").sha
    # A huggingface.co token that a client sends along does not block public reads.
    assert HfApi(endpoint=hub_server.endpoint, token="hf_someone_elses_token").model_info("loraflow/locked").sha


def test_uploads_are_checked_like_local_publishes(hub_server, api, tiny_adapter, tmp_path):
    from huggingface_hub.errors import HfHubHTTPError

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_adapter, pickled)
    (pickled / "adapter_model.bin").write_bytes(b"not really a pickle, but named like one")
    with pytest.raises(HfHubHTTPError) as refused:
        api.upload_folder(repo_id="loraflow/pickled", folder_path=pickled)
    assert _http_status(refused) == 422
    assert "pickle weights are refused" in refused.value.server_message
    assert "pickled" not in hub_server.registry.names()

    broken = tmp_path / "broken"
    shutil.copytree(tiny_adapter, broken)
    (broken / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(HfHubHTTPError) as refused:
        api.upload_folder(repo_id="loraflow/broken", folder_path=broken)
    assert "not a readable safetensors file" in refused.value.server_message

    api.upload_folder(repo_id="loraflow/immutable", folder_path=tiny_adapter)
    with pytest.raises(HfHubHTTPError) as refused:
        api.upload_file(path_or_fileobj=b"{}", path_in_repo="extra.json", repo_id="loraflow/immutable", revision="v1")
    assert _http_status(refused) == 409 and "immutable" in refused.value.server_message
    with pytest.raises(HfHubHTTPError) as refused:
        api.upload_folder(repo_id="elsewhere/immutable", folder_path=tiny_adapter)
    assert _http_status(refused) == 404


def test_peft_vllm_resolver_and_pull_to_cache_through_hf_endpoint(hub_server, api, tiny_base, tiny_adapter, tmp_path):
    api.upload_folder(repo_id="loraflow/peft-tiny", folder_path=tiny_adapter)
    script = f"""
import json, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
from loraflow.hub.hf import pull_to_cache

ids = torch.tensor([[1, 2, 3, 4]])
def logits(adapter):
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(tiny_base.path)!r}), adapter)
    return model(ids).logits[0, -1, :5].tolist()
cached = pull_to_cache({hub_server.endpoint!r}, "peft-tiny", "v1", cache_dir={str(tmp_path / "cache")!r})

import asyncio
from vllm.plugins.lora_resolvers.hf_hub_resolver import HfHubResolver
request = asyncio.run(HfHubResolver(["loraflow/peft-tiny"]).resolve_lora({str(tiny_base.path)!r}, "loraflow/peft-tiny"))
answer = {{"hub": logits("loraflow/peft-tiny"), "local": logits({str(tiny_adapter)!r})}}
print(json.dumps({{**answer, "cached": str(cached), "vllm": request.lora_path}}))
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **_client_env(hub_server, token=None), "HF_HUB_CACHE": str(tmp_path / "hf")},
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["hub"] == answer["local"]
    for folder in (answer["cached"], answer["vllm"]):
        weights = (Path(folder) / "adapter_model.safetensors").read_bytes()
        assert weights == (tiny_adapter / "adapter_model.safetensors").read_bytes()


def test_loraflow_push_and_pull_against_the_server(hub_server, tiny_base, tmp_path):
    from huggingface_hub import HfApi

    local = tmp_path / "local" / "registry.json"
    registry = Registry(local)
    first = registry.publish(
        make_adapter(tiny_base, tmp_path / "a1", seed=1),
        "shanty",
        base=tiny_base,
        trainer={"name": "lora"},
        metrics={"eval_loss": 1.25},
    )
    second = registry.publish(
        make_adapter(tiny_base, tmp_path / "a2", seed=2),
        "shanty",
        base=tiny_base,
        trainer={"name": "dpo"},
        parent="shanty@1",
    )
    env = _client_env(hub_server)
    reader = HfApi(endpoint=hub_server.endpoint, token=False)

    def push(ref: str):
        return run_loraflow("--registry", str(local), "push", ref, "--to-hub", "loraflow/shanty", env=env)

    # NAME@V becomes a candidate on the server's next vN; main stays on the live version.
    assert "loraflow/shanty@v1" in push("shanty@1").stdout
    assert "loraflow/shanty@v2" in push("shanty@2").stdout
    assert hub_server.registry.get("shanty@2").state == "candidate"
    assert reader.model_info("loraflow/shanty").loraflow["version"] == 1
    info = reader.model_info("loraflow/shanty", revision="v2")
    assert info.card_data.base_model == tiny_base.hub_id and info.card_data.library_name == "peft"
    assert "dpo" in info.card_data.tags
    assert info.loraflow["lineage"] == ["shanty@1", "shanty@2"] and info.loraflow["state"] == "candidate"
    assert hub_server.registry.get("shanty@1").metrics == {"eval_loss": 1.25}

    # NAME is the live version: once promoted here, pushing it commits to main, which the server promotes.
    registry.promote(second.ref)
    push("shanty")
    live = hub_server.registry.get("shanty")
    assert live.version == 3 and live.files["adapter_model.safetensors"] == second.files["adapter_model.safetensors"]
    assert reader.model_info("loraflow/shanty").loraflow["version"] == 3
    push("shanty")
    assert hub_server.registry.get("shanty@latest").version == 3  # main already held it: no empty version

    # Pushing an alias makes a candidate the server's alias names; pushing it again with no change makes none.
    registry.set_alias("shanty@1", "production")
    for _ in range(2):
        push("shanty@production")
    production = hub_server.registry.get("shanty@production")
    assert production.version == 4 and production.state == "candidate"
    assert hub_server.registry.get("shanty@latest").version == 4 and hub_server.registry.get("shanty").version == 3
    assert production.files["adapter_model.safetensors"] == first.files["adapter_model.safetensors"]

    read_only = _client_env(hub_server, READ_TOKEN)
    refused = run_loraflow(
        "--registry", str(local), "push", "shanty", "--to-hub", "loraflow/shanty", env=read_only, check=False
    )
    assert refused.returncode == 2 and "HTTP 403" in refused.stderr
    assert READ_TOKEN not in refused.stderr + refused.stdout

    other = tmp_path / "other" / "registry.json"
    run_loraflow(
        "--registry",
        str(other),
        "pull",
        "loraflow/shanty@v1",
        "--name",
        "shanty-copy",
        "--base",
        str(tiny_base.path),
        env=env,
    )
    copy = Registry(other).get("shanty-copy@1")
    assert copy.files["adapter_model.safetensors"] == first.files["adapter_model.safetensors"]
    assert copy.provenance["commit"] == reader.model_info("loraflow/shanty", revision="v1").sha
    assert copy.trainer["name"] == "lora" and copy.metrics == {"eval_loss": 1.25}

    wrong_base = run_loraflow(
        "--registry",
        str(other),
        "pull",
        "loraflow/shanty",
        "--name",
        "misfit",
        "--base",
        "smollm2-135m",
        env=env,
        check=False,
    )
    assert wrong_base.returncode == 2 and "another base model" in wrong_base.stderr
    assert "misfit" not in Registry(other).names()


def test_push_in_the_huggingface_co_layout_one_branch_per_version(hub_server, api, tiny_base, tmp_path, monkeypatch):
    import loraflow.hub.hf

    registry = Registry(tmp_path / "registry.json")
    registry.publish(make_adapter(tiny_base, tmp_path / "a1", seed=3), "tune", base=tiny_base)
    registry.publish(make_adapter(tiny_base, tmp_path / "a2", seed=4), "tune", base=tiny_base, parent="tune@1")
    registry.set_alias("tune@1", "production")
    # Push as to huggingface.co (vN branches, main follows NAME or the alias), against this server speaking the API.
    monkeypatch.setattr(loraflow.hub.hf, "is_loraflow_hub", lambda endpoint: False)
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)

    def push(ref: str):
        return loraflow.hub.hf.push_to_hub(registry, ref, "loraflow/tune", endpoint=hub_server.endpoint)

    first = push("tune@1")
    assert list(first.revisions) == ["v1"]
    assert push("tune@production").revisions == {"v1": first.revisions["v1"], "main": first.revisions["v1"]}
    second = push("tune@2")
    assert list(second.revisions) == ["v2"]
    registry.promote("tune@2")
    latest = push("tune")
    assert list(latest.revisions) == ["v2", "main"] and latest.revisions["v2"] == second.revisions["v2"]
    assert api.model_info("loraflow/tune", revision="v1").sha == first.revisions["v1"]
    assert api.model_info("loraflow/tune").sha == latest.revisions["main"]
    pushed = registry.get("tune@2").files["adapter_model.safetensors"]
    assert hub_server.registry.get("tune@2").files["adapter_model.safetensors"] == pushed
    assert hub_server.registry.get("tune").files["adapter_model.safetensors"] == pushed


def test_main_follows_the_live_version(hub_server, api, tiny_base, tiny_adapter, tmp_path):
    """main is the live version: a commit to the next vN or to an alias makes a candidate, a commit to main promotes."""
    first = api.upload_folder(repo_id="loraflow/follow", folder_path=tiny_adapter)
    assert hub_server.registry.get("follow").version == 1

    other = make_adapter(tiny_base, tmp_path / "other", seed=7)
    candidate = api.upload_folder(repo_id="loraflow/follow", folder_path=other, revision="v2")
    assert hub_server.registry.get("follow@2").state == "candidate"
    assert api.model_info("loraflow/follow").sha == first.oid
    assert api.model_info("loraflow/follow", revision="v2").loraflow["state"] == "candidate"

    api.create_branch("loraflow/follow", branch="staging", revision="v2")
    staged = api.upload_file(
        path_or_fileobj=b"# staged\n", path_in_repo="README.md", repo_id="loraflow/follow", revision="staging"
    )
    assert hub_server.registry.get("follow@staging").version == 3
    assert hub_server.registry.get("follow@3").state == "candidate"
    assert api.model_info("loraflow/follow", revision="staging").sha == staged.oid != candidate.oid
    assert api.model_info("loraflow/follow").sha == first.oid

    promoted = api.upload_folder(repo_id="loraflow/follow", folder_path=other)
    live = hub_server.registry.get("follow")
    assert live.version == 4 and live.state == "live" and hub_server.registry.get("follow@1").state == "retired"
    assert api.model_info("loraflow/follow").sha == promoted.oid
    assert live.files == hub_server.registry.get("follow@2").files  # built on live v1, not on the staging alias
    events = hub_server.registry.history("follow")
    assert (events[-1].action, events[-1].actor, events[-1].version) == ("promote", "hub upload", 4)
    branches = {ref.name: ref.target_commit for ref in api.list_repo_refs("loraflow/follow").branches}
    assert branches["main"] == promoted.oid and branches["v2"] == candidate.oid and branches["staging"] == staged.oid


def test_token_file_errors_name_the_line(tmp_path):
    from loraflow.hub.errors import LoraflowError
    from loraflow.hub.hub_server import HubAccess

    tokens = tmp_path / "tokens.txt"
    tokens.write_text("# team tokens\nhf_writer\nhf_reader read\nhf_bad admin\n")
    with pytest.raises(LoraflowError, match=r"tokens.txt:4: expected"):
        HubAccess.load(tokens)
    tokens.write_text("hf_writer\nhf_reader read\n")
    access = HubAccess.load(tokens)
    roles = [access.role(token) for token in ("hf_writer", "hf_reader", "hf_other", None)]
    assert roles == ["write", "read", "invalid", None]


def test_private_server_needs_a_token_to_read(tiny_base, tiny_adapter, tmp_path):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    server = HubServer(tmp_path, tiny_base.path, "--private")
    try:
        server.registry.publish(tiny_adapter, "secret", base=tiny_base)
        with pytest.raises(HfHubHTTPError) as refused:
            HfApi(endpoint=server.endpoint, token=False).model_info("loraflow/secret")
        assert _http_status(refused) == 401
        assert httpx.get(f"{server.endpoint}/loraflow/secret/resolve/main/adapter_config.json").status_code == 401
        with pytest.raises(HfHubHTTPError) as refused:
            HfApi(endpoint=server.endpoint, token="hf_someone_elses_token").model_info("loraflow/secret")
        assert _http_status(refused) == 401
        assert HfApi(endpoint=server.endpoint, token=READ_TOKEN).model_info("loraflow/secret").loraflow["version"] == 1
    finally:
        server.stop()


def test_a_symlinked_host_file_never_reaches_the_store_or_a_client(hub_server, api, tiny_base, tiny_adapter, tmp_path):
    from huggingface_hub.errors import HfHubHTTPError

    secret = tmp_path / "secret.txt"
    secret.write_text("a host secret")
    folder = tmp_path / "symlink"
    folder.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copyfile(tiny_adapter / name, folder / name)
    (folder / "notes.txt").symlink_to(secret)
    env = {"LORAFLOW_REGISTRY": str(hub_server.registry.path)}
    refused = run_loraflow(
        "registry", "publish", str(folder), "--name", "p", "--base", str(tiny_base.path), env=env, check=False
    )
    assert refused.returncode == 2 and "notes.txt: a symbolic link" in refused.stderr
    assert "p" not in hub_server.registry.names()

    # A client upload gets the same allowlist: a file that is not part of an adapter is refused.
    with pytest.raises(HfHubHTTPError) as upload_refused:
        api.upload_file(path_or_fileobj=b"\0" * 8, path_in_repo="id_rsa", repo_id="loraflow/p")
    assert _http_status(upload_refused) == 422 and "not part of an adapter" in upload_refused.value.server_message

    # A store tampered with after publishing: the server will not follow a link out of it.
    api.upload_folder(repo_id="loraflow/tampered", folder_path=tiny_adapter)
    version = hub_server.registry.get("tampered")
    stored = hub_server.registry.folder(version) / "adapter_config.json"
    stored.unlink()
    stored.symlink_to(secret)
    response = httpx.get(f"{hub_server.endpoint}/loraflow/tampered/resolve/main/adapter_config.json")
    assert response.status_code == 404 and "a host secret" not in response.text
