"""The registry seen as Hub repos: names, revisions, commit ids, file listings, and commits that end in a publish."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Annotated, Literal

from pydantic import BaseModel as Schema
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError

from loraflow.hub.adapters import adapter_files, copy_adapter_files
from loraflow.hub.base import BaseModel
from loraflow.hub.errors import LoraflowError
from loraflow.hub.hub_protocol import LIVE_BRANCH, NAMESPACE, card_metadata, repo_id, version_branch, version_of_branch
from loraflow.hub.registry import AdapterVersion, Registry, RegistrySnapshot, check_name

INLINE_MAX_BYTES = 5 * 1024 * 1024
UPLOADS_DIR = ".hub-uploads"
UPLOAD_URL_LIFETIME_S = 3600
LFS_POINTER_SIZE = 134
COMMIT_ID = re.compile(r"^[0-9a-f]{40}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
UPLOAD_ACTOR = "hub upload"


class HubError(Exception):
    """An HTTP error in the shape huggingface_hub reads: status, X-Error-Code and a message."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


def commit_id(version: AdapterVersion) -> str:
    """A stable commit id for a version: it changes only if its name, number or files do."""
    payload = json.dumps({"name": version.name, "version": version.version, "files": version.files}, sort_keys=True)
    return hashlib.sha1(payload.encode()).hexdigest()


def git_blob_id(path: Path) -> str:
    """The git object id of a file, which huggingface_hub compares to skip unchanged inline files."""
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def safe_relative(path: str) -> str:
    """A repo path that stays inside the repo: no absolute paths, no '..', no empty parts, no control characters."""
    pure = PurePosixPath(path)
    if (
        not path
        or pure.is_absolute()
        or any(part in ("", ".", "..") for part in path.split("/"))
        or any(ord(character) < 32 for character in path)
    ):
        raise HubError(400, f"path {path!r} is not allowed in a repo: use a relative path without '..'.")
    return pure.as_posix()


def describe_validation(error: ValidationError, limit: int = 3) -> str:
    """Pydantic's errors as 'where: what' for a message (the first few; one is usually enough to fix a client)."""
    problems = []
    for item in error.errors()[:limit]:
        where = ".".join(str(part) for part in item["loc"])
        problems.append(f"{where}: {item['msg']}" if where else item["msg"])
    return "; ".join(problems)


class _Strict(Schema):
    # Commit lines are exactly what huggingface_hub sends: an unknown key or a wrong type is a client bug to report.
    model_config = ConfigDict(extra="forbid", strict=True)


class CommitHeader(_Strict):
    summary: str = ""
    description: str = ""
    parentCommit: str | None = None


class AddedFile(_Strict):
    path: str
    content: str
    encoding: Literal["base64"] = "base64"


class AddedLfsFile(_Strict):
    path: str
    oid: str
    algo: Literal["sha256"] = "sha256"
    size: int | None = None


class DeletedPath(_Strict):
    path: str


class _HeaderLine(_Strict):
    key: Literal["header"]
    value: CommitHeader


class _FileLine(_Strict):
    key: Literal["file"]
    value: AddedFile


class _LfsFileLine(_Strict):
    key: Literal["lfsFile"]
    value: AddedLfsFile


class _DeletedFileLine(_Strict):
    key: Literal["deletedFile"]
    value: DeletedPath


class _DeletedFolderLine(_Strict):
    key: Literal["deletedFolder"]
    value: DeletedPath


_OPERATION_LINE = TypeAdapter(
    Annotated[_FileLine | _LfsFileLine | _DeletedFileLine | _DeletedFolderLine, Field(discriminator="key")]
)


@dataclass(frozen=True)
class Change:
    """One checked commit operation: write `content`, copy the LFS object `oid`, or delete a file or folder."""

    action: Literal["write", "lfs", "delete-file", "delete-folder"]
    path: str
    content: bytes = b""
    oid: str = ""


@dataclass(frozen=True)
class Commit:
    header: CommitHeader
    changes: list[Change]


def parse_commit(body: bytes) -> Commit:
    """The NDJSON commit body, every line checked before any is acted on: a header line, then operations."""
    lines = [(number, line) for number, line in enumerate(body.splitlines(), start=1) if line.strip()]
    if not lines:
        raise HubError(400, "the commit body is empty: send a header line (key 'header'), then one line per operation.")
    parsed = []
    for number, line in lines:
        try:
            parsed.append((number, json.loads(line)))
        except (ValueError, RecursionError) as error:  # ValueError covers bad JSON and bytes that are not UTF-8
            raise HubError(400, f"commit line {number} is not valid JSON ({error}); send one JSON object per line.")
    first_number, first = parsed[0]
    if not isinstance(first, dict) or first.get("key") != "header":
        raise HubError(400, f"commit line {first_number}: a commit starts with a header line {{'key': 'header', ...}}.")
    try:
        header = _HeaderLine.model_validate(first).value
    except ValidationError as error:
        raise HubError(400, f"commit line {first_number} (header): {describe_validation(error)}.") from None
    return Commit(header, [_change(number, line) for number, line in parsed[1:]])


def _change(number: int, line) -> Change:
    if not isinstance(line, dict):
        raise HubError(400, f"commit line {number} is a JSON {type(line).__name__}, not an object with key and value.")
    try:
        operation = _OPERATION_LINE.validate_python(line).value
    except ValidationError as error:
        raise HubError(400, f"commit line {number}: {describe_validation(error)}.") from None
    where = f"commit line {number} ({line['key']} {operation.path!r})"
    folder = line["key"] == "deletedFolder"  # huggingface_hub sends a folder as 'name/'
    try:
        path = safe_relative(operation.path.removesuffix("/") if folder else operation.path)
    except HubError as error:
        raise HubError(400, f"{where}: {error.message}") from None
    if isinstance(operation, AddedFile):
        try:
            return Change("write", path, content=base64.b64decode(operation.content, validate=True))
        except binascii.Error:
            raise HubError(400, f"{where}: content is not valid base64.") from None
    if isinstance(operation, AddedLfsFile):
        if not SHA256.match(operation.oid):
            raise HubError(400, f"{where}: oid must be the file's sha256 as 64 lowercase hex digits.")
        return Change("lfs", path, oid=operation.oid)
    return Change("delete-file" if line["key"] == "deletedFile" else "delete-folder", path)


@dataclass(frozen=True)
class CommitPlan:
    """What a commit to a revision does: the version it builds on, and what the new version becomes."""

    base: AdapterVersion | None
    promote: bool
    alias: str | None


class HubRepos:
    """The registry seen as Hub repos: resolving revisions, listing files, applying commits."""

    def __init__(self, registry: Registry, base: BaseModel, inline_max_bytes: int = INLINE_MAX_BYTES):
        self.registry = registry
        self.base = base
        self.inline_max_bytes = inline_max_bytes
        self.uploads = registry.store / UPLOADS_DIR  # inside the store, which is ignored and cleaned with it
        self.secret = secrets.token_bytes(32)

    def repo_name(self, namespace: str, name: str) -> str:
        if namespace != NAMESPACE:
            raise HubError(
                404, f"this loraflow hub holds repos under {NAMESPACE}/ only, not {namespace}/.", "RepoNotFound"
            )
        try:
            return check_name(name)
        except LoraflowError:
            lowered = f" (did you mean {repo_id(name.lower())}?)" if _is_valid_name(name.lower()) else ""
            raise HubError(
                400,
                f"{namespace}/{name} is not a valid repo name on a loraflow hub{lowered}: names are lowercase, "
                "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit.",
                "InvalidRepoName",
            ) from None

    def snapshot(self) -> RegistrySnapshot:
        return self.registry.snapshot()

    def exists(self, name: str) -> bool:
        return self.snapshot().has(name)

    def versions(self, name: str) -> list[AdapterVersion]:
        if not self.exists(name):
            raise HubError(404, f"{repo_id(name)}: no such repo; publish or upload a version first.", "RepoNotFound")
        return self.snapshot().versions(name)

    def resolve(self, name: str, revision: str) -> AdapterVersion:
        """main (the live version), vN, an alias or a commit id, to one version."""
        versions = self.versions(name)
        snapshot = self.snapshot()
        number = version_of_branch(revision)
        if revision == LIVE_BRANCH:
            live = snapshot.live(name)
            if live is not None:
                return live
            raise HubError(
                404, f"{repo_id(name)}: main is the live version, and {name} has none now.", "RevisionNotFound"
            )
        for version in versions:
            if version.version == number or (COMMIT_ID.match(revision) and commit_id(version) == revision):
                return version
        if number is None and revision in snapshot.aliases(name):
            return snapshot.resolve(f"{name}@{revision}")
        branches = [version_branch(v.version) for v in versions]
        known = ", ".join([LIVE_BRANCH, *branches, *sorted(snapshot.aliases(name))])
        raise HubError(404, f"{repo_id(name)} has no revision {revision!r}; it has {known}.", "RevisionNotFound")

    def next_version(self, name: str) -> int:
        return self.snapshot().latest(name).version + 1 if self.exists(name) else 1

    def files(self, version: AdapterVersion) -> list[dict]:
        """One entry per file with its size, sha256 and whether it is served as an LFS file."""
        folder = self.registry.folder(version)
        entries = []
        for relative, digest in sorted(version.files.items()):
            path = folder / relative
            size = path.stat().st_size
            lfs = size > self.inline_max_bytes
            entries.append(
                {
                    "path": relative,
                    "size": size,
                    "sha256": digest,
                    "oid": digest if lfs else git_blob_id(path),
                    "lfs": {"oid": digest, "size": size, "pointerSize": LFS_POINTER_SIZE} if lfs else None,
                }
            )
        return entries

    def blob_path(self, oid: str) -> Path | None:
        """An uploaded LFS object, or a file already in the registry with that sha256."""
        uploaded = self.uploads / "objects" / oid
        if uploaded.is_file():
            return uploaded
        snapshot = self.snapshot()
        for name in snapshot.names():
            for version in snapshot.versions(name):
                for relative, digest in version.files.items():
                    if digest == oid:
                        return self.registry.folder(version) / relative
        return None

    def commit_plan(self, name: str, revision: str, parent_commit: str | None) -> CommitPlan:
        """main: the live files plus the commit, promoted; the next vN: the commit alone, a candidate;
        an alias: its version's files plus the commit, a candidate the alias then names. Versions never change."""
        snapshot = self.snapshot()
        exists = snapshot.has(name)
        number = version_of_branch(revision)
        if number is not None:
            upcoming = self.next_version(name)
            if number != upcoming:
                raise HubError(
                    409,
                    f"{repo_id(name)}: v{number} cannot take a commit; versions are immutable and this hub numbers "
                    f"them itself. The next version is v{upcoming}: commit to v{upcoming} (a candidate) or to main "
                    "(published and made live).",
                )
            plan = CommitPlan(base=None, promote=False, alias=None)
        elif revision == LIVE_BRANCH:
            plan = CommitPlan(base=snapshot.live(name) if exists else None, promote=True, alias=None)
        elif exists and revision in snapshot.aliases(name):
            plan = CommitPlan(base=snapshot.resolve(f"{name}@{revision}"), promote=False, alias=revision)
        else:
            raise HubError(
                404,
                f"{repo_id(name)}: commit to main, to an alias, or to the next vN; not to {revision!r}.",
                "RevisionNotFound",
            )
        current = commit_id(plan.base) if plan.base else None
        if parent_commit and parent_commit != current:
            raise HubError(
                412,
                f"{repo_id(name)}@{revision} is at {current}, not at parent commit {parent_commit}; fetch and retry.",
            )
        return plan

    def apply_commit(self, name: str, revision: str, commit: Commit) -> AdapterVersion:
        """Build the new tree in a staging folder, then hand it to Registry.publish (one atomic write)."""
        plan = self.commit_plan(name, revision, commit.header.parentCommit)
        sources = {change.oid: self.blob_path(change.oid) for change in commit.changes if change.action == "lfs"}
        check_lfs_sources(commit.changes, sources)
        self.sweep_stale_uploads()
        self.uploads.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".commit-", dir=self.uploads))
        try:
            if plan.base is not None:
                source = self.registry.folder(plan.base)
                copy_adapter_files(source, staging, adapter_files(source))
            for change in commit.changes:
                apply_change(staging, change, sources.get(change.oid))
            version = self._publish(staging, name, revision, commit.header, plan)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        remove_spent_uploads(sources, self.uploads)
        return version

    def _publish(
        self, staging: Path, name: str, revision: str, header: CommitHeader, plan: CommitPlan
    ) -> AdapterVersion:
        card = card_metadata(staging)
        try:
            version = self.registry.publish(
                staging,
                name,
                base=self.base,
                trainer=card.get("trainer") or {"name": "upload"},
                metrics=card.get("metrics") or {},
                provenance={
                    "source": "hub-upload",
                    "revision": revision,
                    "summary": header.summary,
                    "card_lineage": card.get("lineage", []),
                },
                promote=plan.promote,
                actor=UPLOAD_ACTOR,
                reason=header.summary or f"commit to {revision}",
            )
        except LoraflowError as error:
            message = str(error).replace(str(staging), f"{repo_id(name)}@{revision}")
            raise HubError(422, f"upload refused: {message}") from None
        if plan.alias:
            self.registry.set_alias(version.ref, plan.alias)
        return version

    def sweep_stale_uploads(self, older_than_s: float = 24 * 3600) -> None:
        """LFS objects never committed, and staging left by a killed server, go after a day."""
        for leftover in [*self.uploads.glob("objects/*"), *self.uploads.glob(".commit-*")]:
            try:
                stale = time.time() - leftover.stat().st_mtime > older_than_s
            except FileNotFoundError:  # another request removed it meanwhile
                continue
            if stale and leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            elif stale:
                leftover.unlink(missing_ok=True)

    def sign_upload(self, oid: str, size: int) -> tuple[int, str]:
        expires = int(time.time()) + UPLOAD_URL_LIFETIME_S
        return expires, hmac.new(self.secret, f"{oid}:{size}:{expires}".encode(), hashlib.sha256).hexdigest()

    def check_upload_signature(self, oid: str, size: int, expires: int, signature: str) -> None:
        expected = hmac.new(self.secret, f"{oid}:{size}:{expires}".encode(), hashlib.sha256).hexdigest()
        if expires < time.time() or not hmac.compare_digest(expected, signature):
            raise HubError(403, "this upload URL is invalid or expired; ask the LFS batch endpoint for a new one.")


def _is_valid_name(name: str) -> bool:
    try:
        check_name(name)
    except LoraflowError:
        return False
    return True


def check_lfs_sources(changes: list[Change], sources: dict[str, Path | None]) -> None:
    """Every LFS change names an object this hub holds (`sources`: oid to its file, or None); else a 422."""
    for change in changes:
        if change.action == "lfs" and sources[change.oid] is None:
            raise HubError(
                422,
                f"{change.path}: LFS object {change.oid} was never uploaded; upload it through the LFS batch API.",
            )


def remove_spent_uploads(sources: dict[str, Path | None], uploads: Path) -> None:
    """After a commit, the uploaded LFS objects it copied go; files it copied from a stored revision stay."""
    for path in sources.values():
        if path is not None and path.parent == uploads / "objects":
            path.unlink(missing_ok=True)


def apply_change(staging: Path, change: Change, lfs_source: Path | None) -> None:
    """One checked change to a staging tree. A written file replaces the old one (never writes through it: a
    staging tree may hold hard links into an immutable revision)."""
    target = staging / change.path
    try:
        if change.action in ("write", "lfs"):
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.is_symlink() or target.is_file():
                target.unlink()
        if change.action == "write":
            target.write_bytes(change.content)
        elif change.action == "lfs":
            shutil.copyfile(lfs_source, target)
        elif change.action == "delete-file":
            if not target.is_file():
                raise HubError(
                    404, f"{change.path}: A file with this name doesn't exist in the revision.", "EntryNotFound"
                )
            target.unlink()
        else:
            shutil.rmtree(target, ignore_errors=True)
    except OSError as error:  # a path that is a file and a folder at once, or too long for the file system
        raise HubError(422, f"{change.path}: cannot be part of the new version ({error.strerror}).") from None
