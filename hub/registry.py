"""The adapter registry: named adapters, their versions, lineage, hashes, metrics, aliases and lifecycle.

One JSON file (schema-versioned) lists everything; the adapter files live in a store folder beside it
(`adapters/NAME/vN/`). `RegistrySnapshot` is the one model of that file: it validates the schema and resolves
NAME, NAME@V and NAME@ALIAS; the CLI, the vLLM resolver, the remote view, the Hub server and the arena all ask it.
`Registry` is the file: reads are snapshots (re-parsed only when the file changed), and every change takes a file
lock, writes a temporary file, fsyncs it and renames it over the old one, so readers never see a half-written
registry and a killed writer loses nothing. Each lifecycle transition is recorded in the name's history.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import orjson
from filelock import FileLock

from loraflow.hub.adapters import adapter_files, copy_adapter_files, hash_folder, inspect_adapter
from loraflow.hub.base import BaseModel, check_adapter_fits
from loraflow.hub.errors import LoraflowError

SCHEMA_VERSION = 2
DEFAULT_REGISTRY = "registry.json"
STORE_DIR = "adapters"
# Indented and sorted for people to read, written by orjson: at 5,000 versions (6 MB) the standard library's indenting
# encoder, pure Python, took 0.9 s of every publish.
REGISTRY_JSON_OPTIONS = orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# An adapter is a LoRA; a reward model scores answers for PPO; a prompt is the base with a system prompt, versioned
# and served by name like an adapter, so the arena can show whether fine-tuning beat prompt engineering.
KINDS = ("adapter", "reward", "prompt")
SERVABLE_KINDS = ("adapter", "prompt")
PROMPT_FILE = "system_prompt.txt"
# The lifecycle: a version is published as a candidate; promotion makes it live (the one NAME means) and retires
# the live one before it; the gate rejects candidates; a rollback rejects the live version and brings back the one
# it replaced. A name's first version is live from the start.
CANDIDATE, LIVE, RETIRED, REJECTED = "candidate", "live", "retired", "rejected"
STATES = (CANDIDATE, LIVE, RETIRED, REJECTED)
# Selectors with a fixed meaning: `latest` is the newest version, `live` the live one, `main` the Hub branch of live.
RESERVED_ALIASES = ("latest", LIVE, "main")


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
            f"by URL. To publish to a loraflow hub, run `HF_ENDPOINT={location} loraflow push NAME --to-hub "
            "loraflow/NAME`."
        )
    return Path(location)


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or ".." in name:
        raise LoraflowError(
            f"adapter name {name!r} is not allowed: use 1-64 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no '/', no '..')."
        )
    return name


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def empty_registry() -> dict:
    return {"schema_version": SCHEMA_VERSION, "revision": 0, "adapters": {}}


@dataclass(frozen=True)
class AdapterRef:
    """NAME, NAME@V or NAME@ALIAS as a user writes it; a bare NAME means the live version."""

    name: str
    selector: str = LIVE

    @classmethod
    def parse(cls, text: str) -> "AdapterRef":
        name, _, selector = str(text).partition("@")
        return cls(check_name(name), selector or LIVE)

    def __str__(self) -> str:
        return f"{self.name}@{self.selector}"


@dataclass
class AdapterVersion:
    """One published, immutable version of a named adapter, and where it stands in the lifecycle."""

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
    state: str = CANDIDATE
    system_prompt: str | None = None  # kind "prompt" only: what the server puts before the conversation

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class Canary:
    """A share of a name's requests sent to a version that is not live yet; promote or rollback ends it."""

    version: AdapterVersion
    percent: float


@dataclass(frozen=True)
class HistoryEvent:
    """One lifecycle transition, or a loop step worth keeping (a failed training): when, what, who and why."""

    time: str
    action: str
    actor: str
    reason: str = ""
    version: int | None = None
    previous: int | None = None


class RegistrySnapshot:
    """One validated, immutable reading of a registry: the only code that interprets registry JSON."""

    def __init__(self, data: dict, source: str = "registry"):
        self._data = _validated(data, source)
        self.source = source

    @classmethod
    def parse(cls, text: str, source: str) -> "RegistrySnapshot":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise LoraflowError(
                f"{source}:{error.lineno}:{error.colno}: the registry is not valid JSON ({error.msg}). "
                "Restore it from version control or a backup; loraflow never writes a partial file."
            ) from None
        return cls(data, source)

    @classmethod
    def empty(cls, source: str = "registry") -> "RegistrySnapshot":
        return cls(empty_registry(), source)

    def to_dict(self) -> dict:
        """A deep copy in the current schema, for a writer to change or a server to send."""
        return orjson.loads(orjson.dumps(self._data))

    @property
    def revision(self) -> int:
        return self._data["revision"]

    def names(self) -> list[str]:
        return sorted(self._data["adapters"])

    def _entry(self, name: str) -> dict:
        entry = self._data["adapters"].get(name)
        if entry is None:
            known = ", ".join(self.names()) or "none yet"
            raise LoraflowError(f"no adapter named {name!r} in {self.source}; known adapters: {known}.")
        return entry

    def has(self, name: str) -> bool:
        return name in self._data["adapters"]

    def versions(self, name: str) -> list[AdapterVersion]:
        entry = self._entry(name)
        return [_version(entry["versions"][key]) for key in sorted(entry["versions"], key=int)]

    def aliases(self, name: str) -> dict[str, int]:
        """The user's aliases (production, staging ...); `latest` and `live` are not aliases but facts."""
        return dict(self._entry(name)["aliases"])

    def history(self, name: str) -> list[HistoryEvent]:
        return [_event(event) for event in self._entry(name)["history"]]

    def latest(self, name: str) -> AdapterVersion:
        return self.versions(name)[-1]

    def live(self, name: str) -> AdapterVersion | None:
        return next((v for v in self.versions(name) if v.state == LIVE), None)

    def canary(self, name: str) -> Canary | None:
        """The version that answers `percent` of the requests for a bare NAME, while a canary runs."""
        entry = self._data["adapters"].get(name)
        canary = entry.get("canary") if entry else None
        if not canary:
            return None
        return Canary(_version(entry["versions"][str(canary["version"])]), canary["percent"])

    def resolve(self, ref: str | AdapterRef) -> AdapterVersion:
        """NAME (the live version), NAME@V, NAME@latest, NAME@live or NAME@ALIAS; an error says what exists."""
        ref = AdapterRef.parse(ref) if isinstance(ref, str) else ref
        entry = self._entry(ref.name)
        number = self._number(entry, ref.selector)
        if number is None or str(number) not in entry["versions"]:
            raise LoraflowError(self._missing(ref))
        return _version(entry["versions"][str(number)])

    def find(self, model: str) -> AdapterVersion | None:
        """What a client's model string names now, or None: the non-raising resolve that serving asks per request."""
        name, _, selector = str(model).partition("@")
        entry = self._data["adapters"].get(name)
        if entry is None:
            return None
        number = self._number(entry, selector or LIVE)
        record = entry["versions"].get(str(number)) if number is not None else None
        return _version(record) if record else None

    @staticmethod
    def _number(entry: dict, selector: str) -> int | None:
        if selector.isdigit():
            return int(selector)
        if selector == "latest":
            return max(int(v) for v in entry["versions"])
        if selector == LIVE:
            return next((int(v) for v, record in entry["versions"].items() if record["state"] == LIVE), None)
        return entry["aliases"].get(selector)

    def _missing(self, ref: AdapterRef) -> str:
        entry = self._entry(ref.name)
        versions = ", ".join(sorted(entry["versions"], key=int))
        if ref.selector.isdigit():
            return f"{ref.name} has no version {ref.selector}; it has {versions}."
        if ref.selector == LIVE:
            return (
                f"{ref.name} has no live version; promote one with `loraflow promote {ref.name}@V` "
                f"(versions: {versions})."
            )
        known = ", ".join(sorted(entry["aliases"])) or "none"
        return (
            f"{ref.name} has no alias {ref.selector!r}; its aliases are {known} "
            "(and latest, live, or a version number)."
        )

    def lineage(self, ref: str | AdapterRef) -> list[AdapterVersion]:
        """The version and its ancestors, oldest first."""
        chain = [self.resolve(ref)]
        while chain[-1].parent:
            chain.append(self.resolve(chain[-1].parent))
        return list(reversed(chain))

    def max_rank(self) -> int:
        """The largest LoRA rank among servable adapters, so a server reserves no more than it needs."""
        ranks = [
            record["lora"].get("r", 0)
            for entry in self._data["adapters"].values()
            for record in entry["versions"].values()
            if record["kind"] in SERVABLE_KINDS
        ]
        return max(ranks, default=0)

    def model_ids(self) -> list[str]:
        """Every name a client may use: NAME, NAME@ALIAS and NAME@V for each servable adapter."""
        ids = []
        for name in self.names():
            versions = [v for v in self.versions(name) if v.kind in SERVABLE_KINDS]
            if not versions:
                continue
            ids.append(name)
            ids += [f"{name}@{alias}" for alias in sorted(self.aliases(name))]
            ids += [v.ref for v in versions]
        return ids


def _validated(data, source: str) -> dict:
    """The registry in the current schema; a registry of schema 1 is read as if its `live` alias were a state."""

    def foreign(why: str) -> LoraflowError:
        return LoraflowError(
            f"{source}: not a loraflow registry file ({why}). A registry is a JSON object with schema_version, "
            "revision and adapters; point --registry (or LORAFLOW_REGISTRY) at one, or at a path that does not exist."
        )

    if not isinstance(data, dict) or "adapters" not in data:
        raise foreign("it is a JSON " + type(data).__name__.replace("dict", "object without 'adapters'"))
    version = data.get("schema_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        raise LoraflowError(
            f"{source}: schema_version {version} was written by a newer loraflow (this one reads up to "
            f"{SCHEMA_VERSION}). Upgrade loraflow."
        )
    if version not in (1, SCHEMA_VERSION) or isinstance(version, bool):
        raise foreign(f"schema_version is {version!r}")
    if not isinstance(data["adapters"], dict):
        raise foreign("'adapters' is not an object")
    for name, entry in data["adapters"].items():
        problem = _entry_problem(name, entry, needs_state=version == SCHEMA_VERSION)
        if problem:
            raise foreign(problem)
    data = {**data, "revision": data.get("revision", 0) if isinstance(data.get("revision"), int) else 0}
    return _upgrade_v1(data) if version == 1 else data


# The type of every field a version record may hold; a record needs the first six.
RECORD_FIELDS = {
    "name": str, "version": int, "kind": str, "path": str, "files": dict, "base": dict, "trainer": dict,
    "parent": (str, type(None)), "created": str, "metrics": dict, "lora": dict, "provenance": dict, "state": str,
    "system_prompt": (str, type(None)),
}  # fmt: skip
REQUIRED_FIELDS = ("name", "version", "kind", "path", "files", "base")
EVENT_FIELDS = {"time": str, "action": str, "actor": str, "reason": str, "version": (int, type(None)),
                "previous": (int, type(None))}  # fmt: skip


def _entry_problem(name: str, entry, needs_state: bool) -> str | None:
    """What makes one name's entry unreadable, or None. Unknown keys are kept and ignored (a newer writer's)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("versions"), dict) or not entry["versions"]:
        return f"the entry for {name!r} has no 'versions' object with at least one version"
    aliases = entry.setdefault("aliases", {})
    if not isinstance(aliases, dict) or not all(_is_int(v) for v in aliases.values()):
        return f"the aliases of {name!r} are not an object of version numbers"
    history = entry.setdefault("history", [])
    if not isinstance(history, list) or not all(
        _fits(event, EVENT_FIELDS, ("time", "action", "actor")) for event in history
    ):
        return f"the history of {name!r} is not a list of events with time, action and actor"
    for number, record in entry["versions"].items():
        if not str(number).isdigit() or not _fits(record, RECORD_FIELDS, REQUIRED_FIELDS):
            fields = ", ".join(f"{key} ({kind.__name__ if isinstance(kind, type) else 'str or null'})"
                               for key, kind in RECORD_FIELDS.items() if key in REQUIRED_FIELDS)  # fmt: skip
            return f"{name} version {number!r} is not a version record with {fields}"
        if record["name"] != name or record["version"] != int(number):
            return f"{name} version {number} names itself {record['name']}@{record['version']}"
        if needs_state and record.get("state") not in STATES:
            return f"{name} version {number} has state {record.get('state')!r}, not one of {', '.join(STATES)}"
    canary = entry.get("canary")
    if canary is not None and not (
        isinstance(canary, dict)
        and _is_int(canary.get("version"))
        and str(canary["version"]) in entry["versions"]
        and isinstance(canary.get("percent"), (int, float))
        and 0 < canary["percent"] < 100
    ):
        return f"the canary of {name!r} is not an object with one of its versions and a percent between 0 and 100"
    return None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fits(record, types: dict, required: tuple[str, ...]) -> bool:
    """A JSON object holding the required keys, whose known keys have the expected types."""
    if not isinstance(record, dict) or any(key not in record for key in required):
        return False
    for key, kind in types.items():
        if key in record and (not isinstance(record[key], kind) or (kind is int and isinstance(record[key], bool))):
            return False
    return True


def _version(record: dict) -> AdapterVersion:
    return AdapterVersion(**{key: record[key] for key in RECORD_FIELDS if key in record})


def _event(record: dict) -> HistoryEvent:
    return HistoryEvent(**{key: record[key] for key in EVENT_FIELDS if key in record})


def _upgrade_v1(data: dict) -> dict:
    """Schema 1 kept the lifecycle in an alias `live` (or none: latest served) and `metrics.gate = rejected`."""
    upgraded = {"schema_version": SCHEMA_VERSION, "revision": data["revision"], "adapters": {}}
    for name, entry in data["adapters"].items():
        aliases = dict(entry.get("aliases", {}))
        aliases.pop("latest", None)
        numbers = sorted(int(v) for v in entry["versions"])
        live = aliases.pop(LIVE, numbers[-1] if numbers else None)
        versions = {}
        for key, record in entry["versions"].items():
            record = {**record, "metrics": dict(record.get("metrics", {}))}
            rejected = record["metrics"].pop("gate", None) == REJECTED
            state = (
                LIVE if int(key) == live else REJECTED if rejected else RETIRED if int(key) < (live or 0) else CANDIDATE
            )
            versions[key] = {**record, "state": state}
        history = [asdict(HistoryEvent(now(), "upgrade", "loraflow", "read from a schema 1 registry", live))]
        upgraded["adapters"][name] = {"versions": versions, "aliases": aliases, "history": history}
    return upgraded


class Registry:
    """The registry file: reads are snapshots, re-parsed only when the file changed; writes go via `_transaction`."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = registry_path(path).resolve()
        self.root = self.path.parent
        self.store = self.root / STORE_DIR
        self._lock = FileLock(str(self.path) + ".lock", timeout=120)
        self._cached: tuple[tuple | None, RegistrySnapshot] | None = None

    @property
    def location(self) -> str:
        return str(self.path)

    def snapshot(self) -> RegistrySnapshot:
        """The registry as it is now. One stat() when nothing changed, since every write replaces the file."""
        try:
            info = self.path.stat()
        except FileNotFoundError:
            return RegistrySnapshot.empty(str(self.path))
        except OSError as error:
            raise LoraflowError(f"{self.path}: cannot read the registry ({error.strerror}).") from None
        stamp = (info.st_ino, info.st_size, info.st_mtime_ns)
        if self._cached and self._cached[0] == stamp:
            return self._cached[1]
        if not stat.S_ISREG(info.st_mode):
            raise LoraflowError(f"{self.path}: is a folder, not a registry file. Pass --registry FOLDER/registry.json.")
        try:
            text = self.path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise LoraflowError(
                f"{self.path}: not a loraflow registry file (byte {error.start} is not UTF-8 text)."
            ) from None
        except OSError as error:
            raise LoraflowError(f"{self.path}: cannot read the registry ({error.strerror}).") from None
        snapshot = RegistrySnapshot.parse(text, str(self.path))
        self._cached = (stamp, snapshot)
        return snapshot

    @property
    def revision(self) -> int:
        """Grows with every write; servers poll it to notice publishes."""
        return self.snapshot().revision

    def names(self) -> list[str]:
        return self.snapshot().names()

    def versions(self, name: str) -> list[AdapterVersion]:
        return self.snapshot().versions(name)

    def aliases(self, name: str) -> dict[str, int]:
        return self.snapshot().aliases(name)

    def history(self, name: str) -> list[HistoryEvent]:
        return self.snapshot().history(name)

    def get(self, ref: str | AdapterRef) -> AdapterVersion:
        return self.snapshot().resolve(ref)

    def live(self, name: str) -> AdapterVersion | None:
        return self.snapshot().live(name)

    def lineage(self, ref: str) -> list[AdapterVersion]:
        return self.snapshot().lineage(ref)

    def max_rank(self) -> int:
        return self.snapshot().max_rank()

    def folder(self, version: AdapterVersion) -> Path:
        return self.root / version.path

    @contextmanager
    def _transaction(self) -> Iterator[dict]:
        self.snapshot()  # an unreadable registry fails here, before anything is created beside it
        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock:
            data = self.snapshot().to_dict()
            yield data
            data["revision"] += 1
            self._write(data)

    def _write(self, data: dict) -> None:
        descriptor, temporary = tempfile.mkstemp(prefix=".registry-", suffix=".json", dir=self.root)
        try:
            with os.fdopen(descriptor, "wb") as stream:
                stream.write(orjson.dumps(data, option=REGISTRY_JSON_OPTIONS))
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
        promote: bool = False,
        actor: str = "user",
        reason: str = "",
    ) -> AdapterVersion:
        """Copy a validated adapter folder into the store as the next version of `name`: a candidate, or live when
        `promote` is set or it is the name's first version (one atomic write either way)."""
        check_name(name)
        if kind not in KINDS or kind == "prompt":
            raise LoraflowError(f"kind {kind!r} is not one of adapter, reward; publish a prompt with publish_prompt.")
        source = Path(folder)
        if not source.is_dir():
            raise LoraflowError(
                f"{source}: not a folder. Give the folder a trainer wrote (it holds adapter_config.json)."
            )
        names = adapter_files(source)
        info = inspect_adapter(source)
        check_adapter_fits(base, source, declared_base=info.declared_base)
        staging = self._stage(lambda target: copy_adapter_files(source, target, names))
        record = {
            "kind": kind,
            "base": base.record(),
            "trainer": dict(trainer or {}),
            "metrics": dict(metrics or {}),
            "lora": {"r": info.rank, "alpha": info.alpha, "target_modules": info.target_modules},
            "provenance": dict(provenance or {}),
        }
        return self._add_version(staging, name, record, parent, promote, actor, reason)

    def publish_prompt(
        self,
        system_prompt: str,
        name: str,
        *,
        base: BaseModel,
        parent: str | None = None,
        metrics: dict | None = None,
        promote: bool = False,
        actor: str = "user",
        reason: str = "",
    ) -> AdapterVersion:
        """Publish a system prompt on the base as the next version of `name` (kind "prompt"): served by name like an
        adapter, so the arena, the leaderboard and `loraflow judge` can pit it against adapters."""
        check_name(name)
        if not isinstance(system_prompt, str) or not system_prompt.strip():
            raise LoraflowError(f"the system prompt for {name} is empty; give the text the base should follow.")
        staging = self._stage(lambda target: (target / PROMPT_FILE).write_text(system_prompt, encoding="utf-8"))
        record = {
            "kind": "prompt",
            "base": base.record(),
            "trainer": {"name": "prompt"},
            "metrics": dict(metrics or {}),
        }
        return self._add_version(
            staging, name, {**record, "system_prompt": system_prompt}, parent, promote, actor, reason
        )

    def _add_version(
        self, staging: Path, name: str, fields: dict, parent: str | None, promote: bool, actor: str, reason: str
    ) -> AdapterVersion:
        """Move a staged folder into the store and record it as the next version of `name`, in one locked write."""
        try:
            if parent is not None:
                parent = self.get(parent).ref
            files = hash_folder(staging)
            with self._transaction() as data:
                entry = data["adapters"].setdefault(name, {"versions": {}, "aliases": {}, "history": []})
                _check_same_kind(entry, name, fields["kind"])
                version = max((int(v) for v in entry["versions"]), default=0) + 1
                target = self.store / name / f"v{version}"
                if target.exists():  # left by a writer killed before it recorded the version
                    shutil.rmtree(target)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging, target)
                record = AdapterVersion(
                    name=name,
                    version=version,
                    path=target.relative_to(self.root).as_posix(),
                    files=files,
                    parent=parent,
                    created=now(),
                    **fields,
                )
                entry["versions"][str(version)] = {
                    k: v for k, v in asdict(record).items() if v is not None or k == "parent"
                }
                _record(entry, "publish", actor, reason, version)
                if promote or version == 1:
                    _make_live(entry, version, "promote", actor, reason or ("first version" if version == 1 else ""))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self.get(record.ref)

    def _stage(self, write: Callable[[Path], object]) -> Path:
        """Write the version's files next to the store first, so the locked part is only a rename."""
        self.snapshot()  # an unreadable registry fails before the store is created
        self.store.mkdir(parents=True, exist_ok=True)
        self._sweep_stale_staging()
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.store))
        try:
            write(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return staging

    def _sweep_stale_staging(self, older_than_s: float = 3600) -> None:
        for leftover in self.store.glob(".staging-*"):
            try:
                stale = time.time() - leftover.stat().st_mtime > older_than_s
            except FileNotFoundError:  # another writer just renamed its staging folder into place
                continue
            if stale:
                shutil.rmtree(leftover, ignore_errors=True)

    def promote(self, ref: str, *, actor: str = "user", reason: str = "") -> AdapterVersion:
        """Make NAME@V the live version; the one it replaces is retired and a running canary ends. Servers answer
        NAME with it at once."""
        version = self.get(ref)
        if version.state == LIVE and self.snapshot().canary(version.name) is None:
            return version
        with self._transaction() as data:
            entry = data["adapters"][version.name]
            if entry["versions"][str(version.version)]["state"] == REJECTED and not reason:
                raise LoraflowError(f"{version.ref} was rejected; give a --reason to promote it all the same.")
            _make_live(entry, version.version, "promote", actor, reason)
        return self.get(version.ref)

    def start_canary(self, ref: str, percent: float, *, actor: str = "user", reason: str = "") -> AdapterVersion:
        """Send `percent` of the requests for a bare NAME to NAME@V and the rest to the live version, until a
        promote (the canary passed) or a rollback (it failed: NAME@V is rejected) ends it."""
        version = self.get(ref)
        if not 0 < percent < 100:
            raise LoraflowError(
                f"--canary {percent:g} is not a percentage between 0 and 100 (exclusive); "
                f"`loraflow promote {version.ref}` sends it all requests."
            )
        if version.state == LIVE or version.kind not in SERVABLE_KINDS:
            why = "is live" if version.kind in SERVABLE_KINDS else f"is a {version.kind}, not servable"
            raise LoraflowError(f"{version.ref} {why}; a canary tries a version that is not live.")
        if version.state == REJECTED and not reason:
            raise LoraflowError(f"{version.ref} was rejected; give a --reason to try it as a canary all the same.")
        with self._transaction() as data:
            entry = data["adapters"][version.name]
            if not any(record["state"] == LIVE for record in entry["versions"].values()):
                raise LoraflowError(f"{version.name} has no live version to share its requests with a canary.")
            entry["canary"] = {"version": version.version, "percent": percent}
            _record(entry, "canary", actor, reason or f"{percent:g}% of {version.name}'s requests", version.version)
        return self.get(version.ref)

    def rollback(self, name: str, *, actor: str = "user", reason: str = "") -> AdapterVersion:
        """During a canary, reject the canary version and keep the live one; otherwise reject the live version and
        bring back the one it replaced (repeated, it walks further back). Returns the version NAME serves now."""
        check_name(name)
        with self._transaction() as data:
            entry = data["adapters"].get(name)
            if entry is None:
                self.snapshot().resolve(name)  # raises, listing the known names
            live = next((int(v) for v, record in entry["versions"].items() if record["state"] == LIVE), None)
            canary = entry.pop("canary", None)
            if canary:
                entry["versions"][str(canary["version"])]["state"] = REJECTED
                _record(entry, "rollback", actor, reason or "canary ended", canary["version"])
                previous = live
            else:
                promotions = [e for e in entry["history"] if e["action"] == "promote" and e["version"] == live]
                previous = promotions[-1]["previous"] if promotions else None
                if previous is None or str(previous) not in entry["versions"]:
                    raise LoraflowError(
                        f"{name}@{live} has no earlier live version to roll back to (see `loraflow registry history "
                        f"{name}`)."
                    )
                _make_live(entry, previous, "rollback", actor, reason, replaced_state=REJECTED)
        return self.get(f"{name}@{previous}")

    def reject(self, ref: str, *, actor: str = "user", reason: str = "") -> AdapterVersion:
        """Mark a candidate rejected: it is never answered as NAME and the arena stops showing it."""
        return self._set_state(ref, REJECTED, "reject", actor, reason)

    def retire(self, ref: str, *, actor: str = "user", reason: str = "") -> AdapterVersion:
        """Mark a version that is not live as done with: no longer a candidate for the loop; NAME@V still reaches it."""
        return self._set_state(ref, RETIRED, "retire", actor, reason)

    def _set_state(self, ref: str, state: str, action: str, actor: str, reason: str) -> AdapterVersion:
        version = self.get(ref)
        if version.state == LIVE:
            raise LoraflowError(
                f"{version.ref} is live; promote another version or run `loraflow rollback {version.name}` first."
            )
        with self._transaction() as data:
            entry = data["adapters"][version.name]
            entry["versions"][str(version.version)]["state"] = state
            _end_canary_of(entry, version.version)
            _record(entry, action, actor, reason, version.version)
        return self.get(version.ref)

    def record_event(self, name: str, action: str, *, actor: str, reason: str, version: int | None = None) -> None:
        """Keep a step in the name's history that changes no state (a training that failed, say)."""
        self.snapshot().resolve(f"{name}@latest")
        with self._transaction() as data:
            _record(data["adapters"][name], action, actor, reason, version)

    def set_alias(self, ref: str, alias: str) -> AdapterVersion:
        version = self.get(ref)
        if alias in RESERVED_ALIASES:
            raise LoraflowError(
                f"alias {alias!r} is reserved: latest is always the newest version and live the promoted one "
                f"(`loraflow promote {version.ref}`). Choose another alias, e.g. production."
            )
        if not NAME_PATTERN.match(alias) or alias.isdigit():
            raise LoraflowError(
                f"alias {alias!r} is not allowed: use lowercase letters, digits, '.', '_' or '-', not only digits."
            )
        with self._transaction() as data:
            data["adapters"][version.name]["aliases"][alias] = version.version
        return version

    def record_metrics(self, ref: str, metrics: dict) -> AdapterVersion:
        """Add measurements taken after publishing (an evaluation, a vote count)."""
        version = self.get(ref)
        with self._transaction() as data:
            data["adapters"][version.name]["versions"][str(version.version)]["metrics"].update(metrics)
        return self.get(version.ref)

    def remove(self, ref: str) -> AdapterVersion:
        """Delete one version. Refused while it is live (unless it is the last) or behind an alias."""
        version = self.get(ref)
        with self._transaction() as data:
            entry = data["adapters"][version.name]
            pinned = [alias for alias, v in entry["aliases"].items() if v == version.version]
            if pinned:
                raise LoraflowError(
                    f"{version.ref} is behind alias {', '.join(pinned)}; move the alias first "
                    f"(loraflow registry alias {version.name}@OTHER {pinned[0]})."
                )
            if version.state == LIVE and len(entry["versions"]) > 1:
                raise LoraflowError(f"{version.ref} is live; promote another version or roll back before removing it.")
            del entry["versions"][str(version.version)]
            _end_canary_of(entry, version.version)
            if entry["versions"]:
                _record(entry, "remove", "user", "", version.version)
            else:
                del data["adapters"][version.name]
        shutil.rmtree(self.folder(version), ignore_errors=True)
        return version


def _record(
    entry: dict, action: str, actor: str, reason: str, version: int | None, previous: int | None = None
) -> None:
    entry.setdefault("history", []).append(asdict(HistoryEvent(now(), action, actor, reason, version, previous)))


def _check_same_kind(entry: dict, name: str, kind: str) -> None:
    """A prompt's versions are prompts, and an adapter's are not: a name's lineage compares like with like."""
    kinds = {record["kind"] for record in entry["versions"].values()}
    if kinds and ("prompt" in kinds) != (kind == "prompt"):
        held = ", ".join(sorted(kinds))
        raise LoraflowError(
            f"{name} holds {held} versions; a {kind} needs a name of its own (for example {name}-{kind})."
        )


def _make_live(entry: dict, number: int, action: str, actor: str, reason: str, replaced_state: str = RETIRED) -> None:
    """The one transition into `live`: at most one live version per name, and the step is in the history."""
    previous = None
    for key, record in entry["versions"].items():
        if record["state"] == LIVE and int(key) != number:
            record["state"] = replaced_state
            previous = int(key)
    entry["versions"][str(number)]["state"] = LIVE
    entry.pop("canary", None)
    _record(entry, action, actor, reason, number, previous)


def _end_canary_of(entry: dict, number: int) -> None:
    if entry.get("canary", {}).get("version") == number:
        del entry["canary"]
