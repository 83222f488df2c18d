"""What a client's `model` string means, asked of the registry per request: NAME (the live version), NAME@V
(pinned) or NAME@ALIAS.

A registry view is anything with `snapshot()`, `folder(version)`, `store` and `location`: the registry file
itself (`loraflow.hub.registry.Registry`, which re-parses only when the file changed, so resolving a name per
request costs one stat()), or `loraflow.serve.remote_registry.RemoteRegistry` for a registry served by URL.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import Callable, Protocol

from loraflow.hub.errors import LoraflowError
from loraflow.hub.registry import SERVABLE_KINDS, AdapterVersion, Registry, RegistrySnapshot, is_registry_url

RESOLVER_CACHE_ENV = "LORAFLOW_RESOLVER_CACHE"
VERSION_HEADER = "x-loraflow-version"  # on every answer: the NAME@V (or the base) that produced it
# A LoRARequest is a few hundred bytes, so 1024 cost under a megabyte and exceed any practical --max-cpu-loras.
DEFAULT_RESOLVER_CACHE = 1024


class RegistryView(Protocol):
    location: str
    store: Path

    def snapshot(self) -> RegistrySnapshot: ...

    def folder(self, version: AdapterVersion) -> Path: ...


def open_registry_view(location: str, poll_s: float | None = None) -> RegistryView:
    """The registry file, or a `loraflow hub serve` URL (polled every poll_s; 0: on each read)."""
    if is_registry_url(location):
        from loraflow.serve.remote_registry import RemoteRegistry

        return RemoteRegistry(location, poll_s)
    return Registry(location)


def servable(
    snapshot: RegistrySnapshot, model: str, draw: Callable[[], float] = random.random
) -> AdapterVersion | None:
    """The version `model` names now, or None when it names no servable registry version. While a canary runs, a
    bare NAME means the canary version for `percent` of the calls (`draw` is uniform in [0, 1)), the live one else."""
    if not isinstance(model, str):
        return None
    canary = snapshot.canary(model) if "@" not in model else None
    version = canary.version if canary and draw() * 100 < canary.percent else snapshot.find(model)
    return version if version is not None and version.kind in SERVABLE_KINDS else None


def unknown_model_message(snapshot: RegistrySnapshot, model: str, base_names: list[str]) -> str:
    """The 404 text: what was asked, and every name this server answers to."""
    name = model.partition("@")[0]
    if snapshot.has(name):
        versions = ", ".join(f"{v.ref} ({v.state})" for v in snapshot.versions(name))
        aliases = ", ".join(f"{name}@{a}" for a in sorted(snapshot.aliases(name))) or "none"
        live = snapshot.live(name)
        meaning = f"{name} means {live.ref}" if live else f"{name} has no live version"
        return f"The model `{model}` does not exist. {meaning}; versions: {versions}; aliases: {aliases}."
    known = ", ".join(base_names + [i for i in snapshot.model_ids() if "@" not in i])
    return (
        f"The model `{model}` does not exist. This server answers to: {known} "
        f"(and NAME@VERSION for any adapter version; GET /v1/models lists them)."
    )


def check_servable(
    version: AdapterVersion, folder: Path, store: Path, base_fingerprint: str | None, max_rank: int | None
) -> None:
    """Raise LoraflowError unless the folder is inside the store, safetensors only, unchanged and fits the base."""
    from loraflow.hub.adapters import PICKLE_SUFFIXES, inspect_adapter, verify_hashes

    real_folder, real_store = os.path.realpath(folder), os.path.realpath(store)
    if os.path.commonpath([real_folder, real_store]) != real_store:
        raise LoraflowError(
            f"{version.ref}: its path {version.path!r} leaves the registry store {real_store}; refusing to load it. "
            "Re-publish the adapter with `loraflow registry publish`."
        )
    if base_fingerprint and version.base.get("fingerprint") != base_fingerprint:
        raise LoraflowError(
            f"{version.ref} was trained on base {version.base.get('name')} ({version.base.get('fingerprint')}), "
            f"but this server runs a different base ({base_fingerprint}). Serve it with its own base, or retrain it "
            "on this one."
        )
    if max_rank and version.lora.get("r", 0) > max_rank:
        raise LoraflowError(
            f"{version.ref} has LoRA rank {version.lora.get('r')}, above this server's --max-lora-rank {max_rank}. "
            "Restart `loraflow serve`; it sizes the rank from the registry."
        )
    pickles = [p.name for p in Path(real_folder).rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES]
    if pickles:
        raise LoraflowError(f"{real_folder}: holds pickle files {pickles}; loraflow loads safetensors only.")
    verify_hashes(Path(real_folder), version.files)
    inspect_adapter(Path(real_folder))


def env_limit(name: str, default: float, *, whole: bool = True, minimum: float = 1) -> float:
    """A size limit from the environment variable `name`, `default` when unset; a bad value names the variable."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw) if whole else float(raw)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value < minimum:
        kind = "a whole number" if whole else "a number"
        raise LoraflowError(
            f"{name}={raw!r} is not {kind} of at least {minimum:g}. Set it to one, or unset it for the default "
            f"({default:g})."
        )
    return value


def resolver_cache_size() -> int:
    """How many resolved versions the resolver's table keeps (LORAFLOW_RESOLVER_CACHE, default 1024)."""
    return int(env_limit(RESOLVER_CACHE_ENV, DEFAULT_RESOLVER_CACHE))
