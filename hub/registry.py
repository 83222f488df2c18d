"""The adapter registry: named adapters, their versions, lineage, hashes, metrics and aliases.

One JSON file (schema-versioned) lists everything; the adapter files live in a store folder beside it
(`adapters/NAME/vN/`). Every change takes a file lock, writes a temporary file, fsyncs it and renames it
over the old one, so readers never see a half-written registry and a killed writer loses nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from filelock import FileLock

from hub.adapters import hash_folder, inspect_adapter
from hub.base import BaseModel, check_adapter_fits
from hub.errors import LoraflowError

SCHEMA_VERSION = 1
DEFAULT_REGISTRY = "registry.json"
STORE_DIR = "adapters"
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
KINDS = ("adapter", "reward")


def registry_location(explicit: str | os.PathLike | None = None) -> str:
    """--registry beats LORAFLOW_REGISTRY beats ./registry.json: a file, or the URL of a `loraflow hub serve`."""
    return str(explicit or os.environ.get("LORAFLOW_REGISTRY") or DEFAULT_REGISTRY)


def is_registry_url(location: str | os.PathLike) -> bool:
    return str(location).startswith(("http://", "https://"))


def registry_path(explicit: str | os.PathLike | None = None) -> Path:
    location = registry_location(explicit)
    if is_registry_url(location):
        raise LoraflowError(
            f"registry {location} is a URL; this command needs a registry file. Only `loraflow serve` reads a registry "
            f"by URL. To publish to a loraflow hub, run `HF_ENDPOINT={location} loraflow push NAME --to-hub loraflow/NAME`."
        )
    return Path(location)


def max_lora_rank(data: dict) -> int:
    """The largest LoRA rank among a registry's servable adapters, so a server reserves no more than it needs."""
    ranks = [
        record["lora"].get("r", 0)
        for entry in data["adapters"].values()
        for record in entry["versions"].values()
        if record["kind"] == "adapter"
    ]
    return max(ranks, default=0)


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name) or ".." in name:
        raise LoraflowError(
            f"adapter name {name!r} is not allowed: use 1-64 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no '/', no '..')."
        )
    return name


@dataclass(frozen=True)
class AdapterRef:
    """NAME, NAME@V or NAME@ALIAS as a user writes it."""

    name: str
    selector: str = "latest"

    @classmethod
    def parse(cls, text: str) -> "AdapterRef":
        name, _, selector = text.partition("@")
        return cls(check_name(name), selector or "latest")

    def __str__(self) -> str:
        return f"{self.name}@{self.selector}"


@dataclass
class AdapterVersion:
    """One published, immutable version of a named adapter."""

    name: str
    version: int
    kind: str
    path: str
    files: dict[str, str]
    base: dict
    trainer: dict
    parent: str | None
    created: str
    metrics: dict = field(default_factory=dict)
    lora: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


class Registry:
    """Reads are lock-free snapshots of the file; every write goes through `_transaction`."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = registry_path(path).resolve()
        self.root = self.path.parent
        self.store = self.root / STORE_DIR
        self._lock = FileLock(str(self.path) + ".lock", timeout=120)

    def load(self) -> dict:
        if not self.path.exists():
            return {"schema_version": SCHEMA_VERSION, "revision": 0, "adapters": {}}
        text = self.path.read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise LoraflowError(
                f"{self.path}:{error.lineno}: the registry is not valid JSON ({error.msg}). "
                "Restore it from version control or a backup; loraflow never writes a partial file."
            ) from None
        if data.get("schema_version") != SCHEMA_VERSION:
            raise LoraflowError(
                f"{self.path}: schema_version {data.get('schema_version')!r}, but this loraflow reads {SCHEMA_VERSION}. "
                "Upgrade loraflow."
            )
        return data

    @property
    def revision(self) -> int:
        """Grows with every write; servers poll it to notice publishes."""
        return self.load().get("revision", 0)

    @contextmanager
    def _transaction(self) -> Iterator[dict]:
        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock:
            data = self.load()
            yield data
            data["revision"] = data.get("revision", 0) + 1
            self._write(data)

    def _write(self, data: dict) -> None:
        descriptor, temporary = tempfile.mkstemp(prefix=".registry-", suffix=".json", dir=self.root)
        try:
            with os.fdopen(descriptor, "w") as stream:
                json.dump(data, stream, indent=2, sort_keys=True)
                stream.write("\n")
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        directory = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def names(self) -> list[str]:
        return sorted(self.load()["adapters"])

    def versions(self, name: str) -> list[AdapterVersion]:
        entry = self._entry(self.load(), name)
        return [AdapterVersion(**record) for _, record in sorted(entry["versions"].items(), key=lambda kv: int(kv[0]))]

    def aliases(self, name: str) -> dict[str, int]:
        return dict(self._entry(self.load(), name)["aliases"])

    def get(self, ref: str | AdapterRef) -> AdapterVersion:
        """Resolve NAME, NAME@V or NAME@ALIAS to a version."""
        ref = AdapterRef.parse(ref) if isinstance(ref, str) else ref
        entry = self._entry(self.load(), ref.name)
        if ref.selector.isdigit():
            record = entry["versions"].get(ref.selector)
            if record is None:
                known = ", ".join(entry["versions"])
                raise LoraflowError(f"{ref.name} has no version {ref.selector}; it has {known}.")
            return AdapterVersion(**record)
        if ref.selector not in entry["aliases"]:
            known = ", ".join(sorted(entry["aliases"]))
            raise LoraflowError(f"{ref.name} has no alias {ref.selector!r}; its aliases are {known}.")
        return AdapterVersion(**entry["versions"][str(entry["aliases"][ref.selector])])

    def folder(self, version: AdapterVersion) -> Path:
        return self.root / version.path

    def _entry(self, data: dict, name: str) -> dict:
        entry = data["adapters"].get(name)
        if entry is None:
            known = ", ".join(sorted(data["adapters"])) or "none yet"
            raise LoraflowError(f"no adapter named {name!r} in {self.path}; known adapters: {known}.")
        return entry

    def publish(
        self,
        folder: str | os.PathLike,
        name: str,
        *,
        base: BaseModel,
        trainer: dict | None = None,
        parent: str | None = None,
        metrics: dict | None = None,
        kind: str = "adapter",
        provenance: dict | None = None,
    ) -> AdapterVersion:
        """Copy a validated adapter folder into the store as the next version of `name`."""
        check_name(name)
        if kind not in KINDS:
            raise LoraflowError(f"kind {kind!r} is not one of {', '.join(KINDS)}.")
        source = Path(folder)
        info = inspect_adapter(source)
        check_adapter_fits(base, source, declared_base=info.declared_base)
        if parent is not None:
            parent = self.get(parent).ref
        staging = self._stage(source)
        files = hash_folder(staging)
        try:
            with self._transaction() as data:
                entry = data["adapters"].setdefault(name, {"versions": {}, "aliases": {}})
                version = max((int(v) for v in entry["versions"]), default=0) + 1
                target = self.store / name / f"v{version}"
                if target.exists():  # left by a writer killed before it recorded the version
                    shutil.rmtree(target)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging, target)
                record = AdapterVersion(
                    name=name,
                    version=version,
                    kind=kind,
                    path=target.relative_to(self.root).as_posix(),
                    files=files,
                    base=base.record(),
                    trainer=dict(trainer or {}),
                    parent=parent,
                    created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    metrics=dict(metrics or {}),
                    lora={"r": info.rank, "alpha": info.alpha, "target_modules": info.target_modules},
                    provenance=dict(provenance or {}),
                )
                entry["versions"][str(version)] = asdict(record)
                entry["aliases"]["latest"] = version
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return record

    def _stage(self, source: Path) -> Path:
        """Copy the folder next to the store first, so the locked part is only a rename."""
        self.store.mkdir(parents=True, exist_ok=True)
        self._sweep_stale_staging()
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.store))
        shutil.copytree(source, staging, dirs_exist_ok=True)
        return staging

    def _sweep_stale_staging(self, older_than_s: float = 3600) -> None:
        for leftover in self.store.glob(".staging-*"):
            try:
                stale = time.time() - leftover.stat().st_mtime > older_than_s
            except FileNotFoundError:  # another writer just renamed its staging folder into place
                continue
            if stale:
                shutil.rmtree(leftover, ignore_errors=True)

    def set_alias(self, ref: str, alias: str) -> AdapterVersion:
        version = self.get(ref)
        if not NAME_PATTERN.match(alias) or alias.isdigit():
            raise LoraflowError(f"alias {alias!r} is not allowed: use lowercase letters, digits, '.', '_' or '-', not only digits.")
        with self._transaction() as data:
            self._entry(data, version.name)["aliases"][alias] = version.version
        return version

    def record_metrics(self, ref: str, metrics: dict) -> AdapterVersion:
        """Add measurements taken after publishing (an evaluation, a vote count)."""
        version = self.get(ref)
        with self._transaction() as data:
            record = self._entry(data, version.name)["versions"][str(version.version)]
            record["metrics"].update(metrics)
        return self.get(version.ref)

    def remove(self, ref: str) -> AdapterVersion:
        """Delete one version. Refused while a user alias other than `latest` points at it."""
        version = self.get(ref)
        with self._transaction() as data:
            entry = self._entry(data, version.name)
            pinned = [alias for alias, v in entry["aliases"].items() if v == version.version and alias != "latest"]
            if pinned:
                raise LoraflowError(
                    f"{version.ref} is behind alias {', '.join(pinned)}; move the alias first "
                    f"(loraflow registry alias {version.name}@OTHER {pinned[0]})."
                )
            del entry["versions"][str(version.version)]
            if entry["versions"]:
                entry["aliases"]["latest"] = max(int(v) for v in entry["versions"])
            else:
                del data["adapters"][version.name]
        shutil.rmtree(self.folder(version), ignore_errors=True)
        return version

    def max_rank(self) -> int:
        return max_lora_rank(self.load())

    def lineage(self, ref: str) -> list[AdapterVersion]:
        """The version and its ancestors, oldest first."""
        chain = [self.get(ref)]
        while chain[-1].parent:
            chain.append(self.get(chain[-1].parent))
        return list(reversed(chain))
