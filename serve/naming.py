"""What a client's `model` string means: NAME (behind the served alias), NAME@V (pinned) or NAME@ALIAS.

`LiveRegistry` re-reads the registry file only when its inode, size or mtime changed (the registry
replaces the file atomically on every write), so resolving a name per request costs one stat().
`serve.remote_registry.RemoteRegistry` answers the same questions for a registry served by URL.
"""

from __future__ import annotations

import os
from pathlib import Path

from hub.errors import LoraflowError
from hub.registry import NAME_PATTERN, AdapterVersion, Registry, is_registry_url, max_lora_rank

SERVABLE_KIND = "adapter"


def open_registry_view(location: str, default_alias: str = "latest", poll_s: float | None = None) -> "LiveRegistry":
    """The live view of a registry file, or of a `loraflow hub serve` URL (polled every poll_s; 0: on each read)."""
    if is_registry_url(location):
        from serve.remote_registry import RemoteRegistry

        return RemoteRegistry(location, default_alias, poll_s)
    return LiveRegistry(location, default_alias)


class LiveRegistry:
    """A cached, self-refreshing view of one registry file."""

    def __init__(self, path: str | os.PathLike, default_alias: str = "latest"):
        self.registry = Registry(path)
        self.default_alias = default_alias
        self._stamp: tuple | None = None
        self._data: dict = {"adapters": {}, "revision": 0}

    def data(self) -> dict:
        try:
            stat = self.registry.path.stat()
            stamp = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            self._data = self.registry.load() if stamp else {"adapters": {}, "revision": 0}
            self._stamp = stamp
        return self._data

    @property
    def revision(self) -> int:
        return self.data().get("revision", 0)

    @property
    def store(self) -> Path:
        """The folder every adapter this view loads must be inside."""
        return self.registry.store

    @property
    def location(self) -> str:
        return str(self.registry.path)

    def max_rank(self) -> int:
        return max_lora_rank(self.data())

    def resolve(self, model: str) -> AdapterVersion | None:
        """The version `model` names now, or None when it names no servable registry adapter."""
        name, _, selector = model.partition("@")
        if not NAME_PATTERN.match(name):
            return None
        entry = self.data()["adapters"].get(name)
        if entry is None:
            return None
        if not selector:
            selector = self.default_alias if self.default_alias in entry["aliases"] else "latest"
        version = selector if selector.isdigit() else entry["aliases"].get(selector)
        record = entry["versions"].get(str(version)) if version is not None else None
        if record is None or record["kind"] != SERVABLE_KIND:
            return None
        return AdapterVersion(**record)

    def pinned(self, model: str) -> str | None:
        """NAME@V for a registry name, so two spellings of one version share one loaded adapter."""
        version = self.resolve(model)
        return version.ref if version else None

    def model_ids(self) -> list[str]:
        """Every name a client may use: NAME, NAME@ALIAS and NAME@V for each servable adapter."""
        ids = []
        for name, entry in sorted(self.data()["adapters"].items()):
            versions = [v for v, record in entry["versions"].items() if record["kind"] == SERVABLE_KIND]
            if not versions:
                continue
            ids.append(name)
            ids += [f"{name}@{alias}" for alias in sorted(entry["aliases"]) if alias != "latest"]
            ids += [f"{name}@{v}" for v in sorted(versions, key=int)]
        return ids

    def folder(self, version: AdapterVersion) -> Path:
        """The local folder holding `version`; the resolver calls it off the event loop."""
        return self.registry.folder(version)

    def unknown_model_message(self, model: str, base_names: list[str]) -> str:
        """The 404 text: what was asked, and every name this server answers to."""
        name = model.partition("@")[0]
        entry = self.data()["adapters"].get(name)
        if entry is not None:
            versions = ", ".join(f"{name}@{v}" for v in sorted(entry["versions"], key=int))
            aliases = ", ".join(f"{name}@{a}" for a in sorted(entry["aliases"]))
            return f"The model `{model}` does not exist. {name} has versions {versions} and aliases {aliases}."
        known = ", ".join(base_names + [i for i in self.model_ids() if "@" not in i])
        return (
            f"The model `{model}` does not exist. This server answers to: {known} "
            f"(and NAME@VERSION for any adapter version; GET /v1/models lists them)."
        )


def check_servable(version: AdapterVersion, folder: Path, store: Path, base_fingerprint: str | None, max_rank: int | None) -> None:
    """Raise LoraflowError unless the folder is inside the store, safetensors only, unchanged and fits the base."""
    from hub.adapters import PICKLE_SUFFIXES, inspect_adapter, verify_hashes

    real_folder, real_store = os.path.realpath(folder), os.path.realpath(store)
    if os.path.commonpath([real_folder, real_store]) != real_store:
        raise LoraflowError(
            f"{version.ref}: its path {version.path!r} leaves the registry store {real_store}; refusing to load it. "
            "Re-publish the adapter with `loraflow registry publish`."
        )
    if base_fingerprint and version.base.get("fingerprint") != base_fingerprint:
        raise LoraflowError(
            f"{version.ref} was trained on base {version.base.get('name')} ({version.base.get('fingerprint')}), "
            f"but this server runs a different base ({base_fingerprint}). Serve it with its own base, or retrain it on this one."
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
