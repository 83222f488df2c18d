"""The registry seen as Hub repos: names, revisions, commit ids, file listings, and commits that end in a publish."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import shutil
import tempfile
import time
from pathlib import Path, PurePosixPath

from hub.base import BaseModel
from hub.errors import LoraflowError
from hub.hf import card_metadata
from hub.registry import AdapterVersion, Registry, check_name

NAMESPACE = "loraflow"
INLINE_MAX_BYTES = 5 * 1024 * 1024
UPLOADS_DIR = ".hub-uploads"
UPLOAD_URL_LIFETIME_S = 3600
LFS_POINTER_SIZE = 134
VERSION_BRANCH = re.compile(r"^v(\d+)$")
COMMIT_ID = re.compile(r"^[0-9a-f]{40}$")


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
    """A repo path that stays inside the repo: no absolute paths, no '..', no empty parts."""
    pure = PurePosixPath(path)
    if not path or pure.is_absolute() or any(part in ("", ".", "..") for part in path.split("/")):
        raise HubError(400, f"path {path!r} is not allowed in a repo: use a relative path without '..'.")
    return pure.as_posix()


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
            raise HubError(404, f"this loraflow hub holds repos under {NAMESPACE}/ only, not {namespace}/.", "RepoNotFound")
        try:
            return check_name(name)
        except LoraflowError as error:
            raise HubError(404, str(error), "RepoNotFound") from None

    def exists(self, name: str) -> bool:
        return name in self.registry.names()

    def versions(self, name: str) -> list[AdapterVersion]:
        if not self.exists(name):
            raise HubError(404, f"{NAMESPACE}/{name}: no such repo; publish or upload a version first.", "RepoNotFound")
        return self.registry.versions(name)

    def resolve(self, name: str, revision: str) -> AdapterVersion:
        """main, vN, an alias or a commit id, to one version."""
        versions = self.versions(name)
        match = VERSION_BRANCH.match(revision)
        if revision == "main":
            return self.registry.get(f"{name}@latest")
        if match:
            for version in versions:
                if version.version == int(match.group(1)):
                    return version
        elif COMMIT_ID.match(revision):
            for version in versions:
                if commit_id(version) == revision:
                    return version
        elif revision in self.registry.aliases(name):
            return self.registry.get(f"{name}@{revision}")
        known = ", ".join(["main", *(f"v{v.version}" for v in versions), *sorted(self.registry.aliases(name))])
        raise HubError(404, f"{NAMESPACE}/{name} has no revision {revision!r}; it has {known}.", "RevisionNotFound")

    def next_version(self, name: str) -> int:
        return max((v.version for v in self.registry.versions(name)), default=0) + 1 if self.exists(name) else 1

    def files(self, version: AdapterVersion) -> list[dict]:
        """One entry per file with its size, sha256 and whether it is served as an LFS file."""
        folder = self.registry.folder(version)
        entries = []
        for relative, digest in sorted(version.files.items()):
            path = folder / relative
            size = path.stat().st_size
            lfs = size > self.inline_max_bytes
            entries.append({
                "path": relative,
                "size": size,
                "sha256": digest,
                "oid": digest if lfs else git_blob_id(path),
                "lfs": {"oid": digest, "size": size, "pointerSize": LFS_POINTER_SIZE} if lfs else None,
            })
        return entries

    def blob_path(self, oid: str) -> Path | None:
        """An uploaded LFS object, or a file already in the registry with that sha256."""
        uploaded = self.uploads / "objects" / oid
        if uploaded.is_file():
            return uploaded
        for name in self.registry.names():
            for version in self.registry.versions(name):
                for relative, digest in version.files.items():
                    if digest == oid:
                        return self.registry.folder(version) / relative
        return None

    def commit_base(self, name: str, revision: str, parent_commit: str | None) -> AdapterVersion | None:
        """The version a commit builds on (None: an empty tree). Versions themselves never change."""
        match = VERSION_BRANCH.match(revision)
        upcoming = self.next_version(name)
        if match:
            if int(match.group(1)) != upcoming:
                raise HubError(
                    409,
                    f"{NAMESPACE}/{name}: v{match.group(1)} cannot take a commit; versions are immutable and this "
                    f"hub numbers them itself. The next version is v{upcoming}: commit to v{upcoming} or to main.",
                )
            base = None
        elif revision == "main" and not self.exists(name):
            base = None
        elif revision == "main" or (self.exists(name) and revision in self.registry.aliases(name)):
            base = self.resolve(name, revision)
        else:
            raise HubError(
                404, f"{NAMESPACE}/{name}: commit to main, to an alias, or to the next vN; not to {revision!r}.", "RevisionNotFound"
            )
        current = commit_id(base) if base else None
        if parent_commit and parent_commit != current:
            raise HubError(412, f"{NAMESPACE}/{name}@{revision} is at {current}, not at parent commit {parent_commit}; fetch and retry.")
        return base

    def apply_commit(self, name: str, revision: str, header: dict, operations: list[dict]) -> AdapterVersion:
        """Build the new tree in a staging folder, then hand it to Registry.publish."""
        base = self.commit_base(name, revision, header.get("parentCommit"))
        self.sweep_stale_uploads()
        self.uploads.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".commit-", dir=self.uploads))
        used_objects = []
        try:
            if base is not None:
                shutil.copytree(self.registry.folder(base), staging, dirs_exist_ok=True)
            for operation in operations:
                used_objects += self._apply_operation(staging, operation)
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
                        "summary": header.get("summary", ""),
                        "card_lineage": card.get("lineage", []),
                    },
                )
            except LoraflowError as error:
                message = str(error).replace(str(staging), f"{NAMESPACE}/{name}@{revision}")
                raise HubError(422, f"upload refused: {message}") from None
            if revision != "main" and not VERSION_BRANCH.match(revision):
                self.registry.set_alias(version.ref, revision)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        for path in used_objects:
            if path.parent == self.uploads / "objects":
                path.unlink(missing_ok=True)
        return version

    def _apply_operation(self, staging: Path, operation: dict) -> list[Path]:
        key, value = operation.get("key"), operation.get("value") or {}
        if key in ("file", "lfsFile", "deletedFile", "deletedFolder"):
            target = staging / safe_relative(value.get("path", ""))
        else:
            raise HubError(400, f"commit operation {key!r} is not supported by a loraflow hub.")
        if key == "file":
            if value.get("encoding", "base64") != "base64":
                raise HubError(400, f"{value['path']}: only base64 file content is supported.")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(base64.b64decode(value.get("content", "")))
            return []
        if key == "lfsFile":
            source = self.blob_path(str(value.get("oid", "")))
            if source is None:
                raise HubError(422, f"{value['path']}: LFS object {value.get('oid')} was never uploaded; upload it first.")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            return [source]
        if key == "deletedFile":
            if not target.is_file():
                raise HubError(404, f"{value['path']}: A file with this name doesn't exist in the revision.", "EntryNotFound")
            target.unlink()
            return []
        shutil.rmtree(target, ignore_errors=True)
        return []

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
