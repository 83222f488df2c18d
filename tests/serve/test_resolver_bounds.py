"""Bounded memory on a replica: the resolver's table of resolved versions and the download cache are LRUs.

No vLLM server: the table is driven through vLLM's own `OpenAIServingModels.resolve_lora` (its id counter
included) with a stub engine; the download cache is a huggingface_hub cache layout built on disk.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import os
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest

from loraflow.hub.errors import LoraflowError
from loraflow.serve import launcher, naming, remote_registry, resolver
from loraflow.serve.remote_registry import IN_USE_GRACE_S, RemoteRegistry, prune_cache

LONG_AGO = 10 * IN_USE_GRACE_S


class Snapshot:
    """A registry snapshot answering `find` for NAME@V refs and NAME (the highest version)."""

    def __init__(self, refs: list[str]):
        self.refs = refs

    def find(self, model: str):
        if "@" not in model:
            matches = [ref for ref in self.refs if ref.partition("@")[0] == model]
            model = max(matches, key=lambda ref: int(ref.partition("@")[2])) if matches else model
        if model not in self.refs:
            return None
        name, _, number = model.partition("@")
        return SimpleNamespace(ref=model, name=name, version=int(number), kind="adapter")

    def canary(self, name: str):
        return None  # no canary runs here


class View:
    """A registry view whose folders are empty directories in its store."""

    def __init__(self, store: Path, refs: list[str]):
        self.store = store
        self.location = str(store)
        self.current = Snapshot(refs)

    def snapshot(self) -> Snapshot:
        return self.current

    def folder(self, version) -> Path:
        folder = self.store / version.ref
        folder.mkdir(parents=True, exist_ok=True)
        return folder


class Engine:
    """Records every adapter vLLM would load: id -> NAME@V."""

    def __init__(self):
        self.loaded: dict[int, str] = {}

    async def add_lora(self, request) -> bool:
        assert self.loaded.setdefault(request.lora_int_id, request.lora_name) == request.lora_name, "id reused"
        return True


def serving_models(view: View, limit: int, monkeypatch):
    """vLLM's OpenAIServingModels as the resolver plugin sets it up, without a model or an engine."""
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.utils.counter import AtomicCounter

    monkeypatch.setattr(resolver, "check_servable", lambda *args: None)
    models = OpenAIServingModels.__new__(OpenAIServingModels)
    models.engine_client = Engine()
    models.model_config = SimpleNamespace(model="base")
    models.lora_id_counter = AtomicCounter(0)
    models.lora_resolvers = [resolver.RegistryLoRAResolver(view, None, None)]
    models.lora_resolver_lock = defaultdict(asyncio.Lock)
    models.lora_requests = resolver.PinnedLoraTable(view, {}, limit)
    return models


def ask(models, model: str):
    """One request's lookup, as vLLM admits it: in its own task, so with its own pins."""

    async def admit():
        if model in models.lora_requests:
            return models.lora_requests[model]
        return await models.resolve_lora(model)

    return contextvars.Context().run(asyncio.run, admit())


def refs(count: int) -> list[str]:
    return [f"a{index}@1" for index in range(count)]


def test_the_table_never_exceeds_its_limit_and_forgets_the_least_recently_used(tmp_path, monkeypatch):
    view = View(tmp_path / "store", refs(5))
    models = serving_models(view, limit=3, monkeypatch=monkeypatch)
    for ref in refs(3):
        ask(models, ref)
    ask(models, "a0")  # a0@1 is now the most recently used
    ask(models, "a3")
    assert list(models.lora_requests.keys()) == ["a2@1", "a0@1", "a3@1"], "a1@1 was used least recently"
    for ref in refs(5) * 3:
        ask(models, ref)
        assert len(models.lora_requests) <= 3
    assert models.lora_requests.folders == {str((view.store / ref).resolve()) for ref in ("a2@1", "a3@1", "a4@1")}


def test_ids_stay_unique_across_evictions(tmp_path, monkeypatch):
    view = View(tmp_path / "store", refs(4))
    models = serving_models(view, limit=2, monkeypatch=monkeypatch)
    issued = [ask(models, ref) for ref in refs(4) * 3]
    ids = [request.lora_int_id for request in issued]
    assert len(set(ids)) == len(ids), "every resolution after an eviction gets a fresh id from vLLM's counter"
    assert all(request.lora_name == models.engine_client.loaded[request.lora_int_id] for request in issued)
    pinned = ask(models, "a3@1")
    assert ask(models, "a3") is pinned, "a held version keeps its one id under every spelling"


def test_a_request_keeps_its_version_when_the_table_forgets_it(tmp_path, monkeypatch):
    view = View(tmp_path / "store", refs(3))
    models = serving_models(view, limit=1, monkeypatch=monkeypatch)
    first = ask(models, "a0")
    request = contextvars.Context()
    assert request.run(models.lora_requests.__contains__, "a0"), "vLLM's model check"
    ask(models, "a1")
    ask(models, "a2")
    assert "a0@1" not in list(models.lora_requests.keys())
    assert request.run(models.lora_requests.__getitem__, "a0") is first, "vLLM's adapter lookup, later in the request"


def test_entries_the_registry_cannot_resolve_again_are_never_evicted(tmp_path, monkeypatch):
    from vllm.lora.request import LoRARequest

    view = View(tmp_path / "store", refs(3))
    static = LoRARequest(lora_name="static", lora_int_id=99, lora_path=str(tmp_path / "static"))
    models = serving_models(view, limit=1, monkeypatch=monkeypatch)
    models.lora_requests = resolver.PinnedLoraTable(view, {"static": static}, 1)
    for ref in refs(3):
        ask(models, ref)
    assert list(models.lora_requests.keys()) == ["static", "a2@1"]


def test_a_version_whose_folder_was_deleted_is_resolved_again(tmp_path, monkeypatch):
    view = View(tmp_path / "store", refs(1))
    models = serving_models(view, limit=4, monkeypatch=monkeypatch)
    first = ask(models, "a0")
    (view.store / "a0@1").rmdir()  # another replica sharing the download cache pruned it
    again = ask(models, "a0")
    assert again.lora_int_id != first.lora_int_id and (view.store / "a0@1").is_dir()


def test_a_version_removed_while_it_was_checked_is_unknown_not_refused(tmp_path, monkeypatch):
    """The registry drops a version, then deletes its folder: a resolver that read the registry just before finds
    the files gone. If the registry no longer lists the version, vLLM answers 404 (which the fleet's ingress sends
    again for the version NAME means now); if it still lists it, the files went missing and the refusal says so."""
    view = View(tmp_path / "store", ["a0@1", "a0@2"])
    finder = resolver.RegistryLoRAResolver(view, None, None)

    def files_gone(version, *args):
        view.current = Snapshot(["a0@2"])  # removed meanwhile
        raise LoraflowError(f"{version.ref}: missing; the registry recorded it at publish time.")

    monkeypatch.setattr(resolver, "check_servable", files_gone)
    assert asyncio.run(finder.resolve_lora("base", "a0@1")) is None and finder.refusals == {}

    def files_missing(version, *args):
        raise LoraflowError(f"{version.ref}: missing; the registry recorded it at publish time.")

    monkeypatch.setattr(resolver, "check_servable", files_missing)
    assert asyncio.run(finder.resolve_lora("base", "a0@2")) is None
    assert "missing" in finder.refusals["a0@2"]


def cached_version(cache: Path, name: str, commit: str, files: dict[str, bytes], age_s: float) -> Path:
    """A version folder as huggingface_hub's snapshot_download leaves it: links into the repo's blobs."""
    repo = cache / f"models--loraflow--{name}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    then = time.time() - age_s
    for filename, content in files.items():
        blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
        blob.write_bytes(content)
        os.utime(blob, (then, then))
        (snapshot / filename).symlink_to(os.path.relpath(blob, snapshot))
    os.utime(snapshot, (then, then))
    return snapshot


def test_the_download_cache_prunes_the_least_recently_used_versions(tmp_path):
    cache = tmp_path / "cache"
    oldest = cached_version(cache, "a", "c1" * 20, {"adapter_model.safetensors": b"1" * 1000}, LONG_AGO + 3)
    shared = b"{}" * 50
    older = cached_version(cache, "b", "c2" * 20, {"adapter_config.json": shared, "w": b"2" * 900}, LONG_AGO + 2)
    newer = cached_version(cache, "b", "c3" * 20, {"adapter_config.json": shared, "w": b"3" * 900}, LONG_AGO + 1)
    assert prune_cache(cache, 2500) == [oldest]
    assert not (cache / "models--loraflow--a").exists(), "a repo with no version left is removed"
    assert prune_cache(cache, 1500) == [older]
    assert newer.is_dir() and all(path.is_file() for path in newer.iterdir()), "a blob another version links stays"
    assert len(list((cache / "models--loraflow--b" / "blobs").iterdir())) == 2


def test_pruning_spares_versions_in_use_and_recently_written(tmp_path):
    cache = tmp_path / "cache"
    held = cached_version(cache, "a", "c1" * 20, {"w": b"1" * 1000}, LONG_AGO + 2)
    idle = cached_version(cache, "b", "c2" * 20, {"w": b"2" * 1000}, LONG_AGO + 1)
    writing = cached_version(cache, "c", "c3" * 20, {"w": b"3" * 1000}, 1)
    assert prune_cache(cache, 0, keep={str(held)}) == [idle]
    assert held.is_dir() and writing.is_dir(), "the cache stays above its limit while all of it is in use"


def test_a_replica_keeps_the_version_it_used_last(tmp_path, monkeypatch):
    from loraflow.hub import hf

    cache = tmp_path / "cache"
    versions = {
        name: cached_version(cache, name, commit * 20, {"w": content * 1000}, LONG_AGO + age)
        for name, commit, content, age in (("a", "c1", b"1", 3), ("b", "c2", b"2", 2), ("c", "c3", b"3", 1))
    }
    monkeypatch.setattr(hf, "pull_to_cache", lambda url, name, revision, cache_dir: versions[name])
    view = RemoteRegistry("http://registry.invalid", poll_s=0, cache_dir=cache, cache_bytes=2500)
    view.in_use = lambda: {str(versions["b"])}
    assert view.folder(SimpleNamespace(name="a", version=1)) == versions["a"]
    assert versions["a"].is_dir(), "the version just used is the most recent one"
    assert versions["b"].is_dir(), "the resolver still holds it"
    assert not versions["c"].exists(), "the least recently used version not in use"
    monkeypatch.setattr(remote_registry, "IN_USE_GRACE_S", 0)
    assert prune_cache(cache, 1500) == [versions["b"]], "a was used after b, so b goes first"


def test_limits_are_read_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(naming.RESOLVER_CACHE_ENV, raising=False)
    monkeypatch.delenv(remote_registry.ADAPTER_CACHE_ENV, raising=False)
    assert naming.resolver_cache_size() == 1024
    assert RemoteRegistry("http://registry.invalid", cache_dir=tmp_path).cache_bytes == 5_000_000_000
    monkeypatch.setenv(naming.RESOLVER_CACHE_ENV, "64")
    monkeypatch.setenv(remote_registry.ADAPTER_CACHE_ENV, "0.5")
    assert naming.resolver_cache_size() == 64
    assert RemoteRegistry("http://registry.invalid", cache_dir=tmp_path).cache_bytes == 500_000_000


@pytest.mark.parametrize("value", ["0", "-3", "many", "2.5", " "])
def test_a_bad_resolver_limit_names_the_variable(monkeypatch, value):
    monkeypatch.setenv(naming.RESOLVER_CACHE_ENV, value)
    if not value.strip():
        assert naming.resolver_cache_size() == 1024, "blank means unset"
        return
    with pytest.raises(LoraflowError, match=f"LORAFLOW_RESOLVER_CACHE={value!r} is not a whole number of at least 1"):
        naming.resolver_cache_size()


@pytest.mark.parametrize("value", ["-1", "lots", "nan", "inf"])
def test_a_bad_cache_limit_names_the_variable(tmp_path, monkeypatch, value):
    monkeypatch.setenv(remote_registry.ADAPTER_CACHE_ENV, value)
    with pytest.raises(LoraflowError, match=f"LORAFLOW_ADAPTER_CACHE_GB={value!r} is not a number of at least 0"):
        RemoteRegistry("http://registry.invalid", cache_dir=tmp_path)


def server_settings(tmp_path, **overrides) -> launcher.ServerSettings:
    base = SimpleNamespace(fingerprint="f")
    return launcher.ServerSettings(registry=str(tmp_path / "registry.json"), base=base, max_lora_rank=16, **overrides)


def test_the_launcher_passes_the_limits_and_keeps_the_table_above_the_engines_cache(tmp_path, monkeypatch):
    monkeypatch.delenv(naming.RESOLVER_CACHE_ENV, raising=False)
    monkeypatch.delenv(remote_registry.ADAPTER_CACHE_ENV, raising=False)
    environment = server_settings(tmp_path).environment()
    assert (environment["LORAFLOW_RESOLVER_CACHE"], environment["LORAFLOW_ADAPTER_CACHE_GB"]) == ("1024", "5.0")
    assert server_settings(tmp_path, max_cpu_loras=2048).environment()["LORAFLOW_RESOLVER_CACHE"] == "2048"
    monkeypatch.setenv(naming.RESOLVER_CACHE_ENV, "8")
    assert server_settings(tmp_path, max_loras=8).environment()["LORAFLOW_RESOLVER_CACHE"] == "16"
    assert server_settings(tmp_path, resolver_cache=100).environment()["LORAFLOW_RESOLVER_CACHE"] == "100"
    monkeypatch.setenv(remote_registry.ADAPTER_CACHE_ENV, "big")
    with pytest.raises(LoraflowError, match="LORAFLOW_ADAPTER_CACHE_GB"):
        server_settings(tmp_path).environment()
