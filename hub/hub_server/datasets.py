"""Dataset repos on a loraflow hub: ORG/REPO folders beside the registry, each commit an immutable revision.

Layout, next to the registry's `adapters/`:

    datasets/ORG/REPO/repo.json                every commit, oldest first: id, parent, summary, time, files
    datasets/ORG/REPO/revisions/COMMIT/...     that commit's files, never changed after the commit
    datasets/ORG/REPO/.lock                    one writer per repo at a time

`main` is the newest commit; any commit id in repo.json is a revision too. A commit builds its tree in a staging
folder inside the repo (unchanged files are hard links into the parent revision), renames it to
`revisions/COMMIT`, then replaces repo.json (temporary file, fsync, rename): a reader sees the old or the new
state, and a killed writer leaves at most an unreferenced folder. ORG and REPO follow the registry's name rule
(lowercase), so two names never share a folder on a case-insensitive file system.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from loraflow.hub.adapters import sha256_file
from loraflow.hub.hub_protocol import LIVE_BRANCH
from loraflow.hub.hub_server.repos import (
    COMMIT_ID,
    LFS_POINTER_SIZE,
    Commit,
    HubError,
    apply_change,
    check_lfs_sources,
    git_blob_id,
    remove_spent_uploads,
    safe_relative,
)
from loraflow.hub.registry import NAME_PATTERN, now

DATASETS_DIR = "datasets"
MANIFEST = "repo.json"
REVISIONS_DIR = "revisions"
MANIFEST_SCHEMA = 1
MAX_FILES = 10_000
MAX_PATH_CHARS = 1_000
LOCK_TIMEOUT_S = 60
INITIAL_SUMMARY = "initial commit"


@dataclass(frozen=True)
class DatasetCommit:
    """One immutable revision: its id, its parent's id, what it said, when, and its files by path."""

    id: str
    parent: str | None
    summary: str
    created: str
    files: dict[str, dict] = field(default_factory=dict)  # path -> {"size", "sha256", "blob_id"}


def check_dataset_name(org: str, name: str) -> str:
    """ORG/REPO, both parts lowercase registry-style names; anything else is a 400 that says the rule."""
    if all(NAME_PATTERN.match(part) and ".." not in part for part in (org, name)):
        return f"{org}/{name}"
    lowered = f"{org}/{name}".lower()
    hint = (
        f" (did you mean {lowered}?)"
        if all(NAME_PATTERN.match(part) and ".." not in part for part in lowered.split("/"))
        else ""
    )
    raise HubError(
        400,
        f"{org}/{name} is not a valid dataset repo name on a loraflow hub{hint}: ORG and REPO are each lowercase, "
        "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit.",
        "InvalidRepoName",
    )


class DatasetStore:
    """Every dataset repo under `root` (the `datasets/` folder beside the registry). Safe across threads and
    processes: writes to one repo take its file lock; reads need none (repo.json is replaced atomically)."""

    def __init__(self, root: Path, uploads: Path, inline_max_bytes: int):
        self.root = Path(root)
        self.uploads = uploads  # where the LFS upload route puts objects (shared with the model repos)
        self.inline_max_bytes = inline_max_bytes

    def folder(self, repo: str) -> Path:
        return self.root / repo

    def exists(self, repo: str) -> bool:
        return (self.folder(repo) / MANIFEST).is_file()

    @contextmanager
    def _locked(self, repo: str) -> Iterator[None]:
        self.folder(repo).mkdir(parents=True, exist_ok=True)
        try:
            with FileLock(str(self.folder(repo) / ".lock"), timeout=LOCK_TIMEOUT_S):
                yield
        except Timeout:
            raise HubError(503, f"datasets/{repo} is busy with another commit; retry in a minute.") from None

    def commits(self, repo: str) -> list[DatasetCommit]:
        """Oldest first; a repo nobody created is a 404 the client reads as RepositoryNotFoundError."""
        manifest = self.folder(repo) / MANIFEST
        if not manifest.is_file():
            raise HubError(
                404,
                f"datasets/{repo}: no such dataset repo; create it first (create_repo with repo_type='dataset').",
                "RepoNotFound",
            )
        data = json.loads(manifest.read_text())
        return [DatasetCommit(**commit) for commit in data["commits"]]

    def create(self, repo: str) -> bool:
        """Make the repo with an empty initial commit, so `main` exists; False if it existed already."""
        with self._locked(repo):
            if self.exists(repo):
                return False
            initial = self._new_commit(None, INITIAL_SUMMARY, {})
            (self.folder(repo) / REVISIONS_DIR / initial.id).mkdir(parents=True)
            self._write_manifest(repo, [initial])
            return True

    def resolve(self, repo: str, revision: str) -> DatasetCommit:
        """`main` (the newest commit) or a commit id."""
        commits = self.commits(repo)
        if revision == LIVE_BRANCH:
            return commits[-1]
        if COMMIT_ID.match(revision):
            for commit in commits:
                if commit.id == revision:
                    return commit
        raise HubError(
            404,
            f"datasets/{repo} has no revision {revision!r}: a dataset repo on a loraflow hub has one branch, main, "
            "and each of its commit ids.",
            "RevisionNotFound",
        )

    def files(self, commit: DatasetCommit) -> list[dict]:
        """One entry per file (path, size, sha256, oid, lfs) in the shape the model repos list theirs."""
        entries = []
        for path, recorded in sorted(commit.files.items()):
            lfs = recorded["size"] > self.inline_max_bytes
            entries.append(
                {
                    "path": path,
                    "size": recorded["size"],
                    "sha256": recorded["sha256"],
                    "oid": recorded["sha256"] if lfs else recorded["blob_id"],
                    "lfs": {"oid": recorded["sha256"], "size": recorded["size"], "pointerSize": LFS_POINTER_SIZE}
                    if lfs
                    else None,
                }
            )
        return entries

    def file_path(self, repo: str, commit: DatasetCommit, path: str) -> Path:
        """The stored regular file at `path` in a revision, or a 404 (a link is never followed)."""
        relative = safe_relative(path)
        if relative not in commit.files:
            raise HubError(404, f"datasets/{repo}@{commit.id[:12]} has no file {relative!r}.", "EntryNotFound")
        stored = self.folder(repo) / REVISIONS_DIR / commit.id / relative
        if stored.is_symlink() or not stored.is_file():
            raise HubError(404, f"datasets/{repo}: {relative!r} is not a regular file in the store.", "EntryNotFound")
        return stored

    def blob_path(self, repo: str, oid: str) -> Path | None:
        """An uploaded LFS object, or a file of this repo's newest revision with that sha256."""
        uploaded = self.uploads / "objects" / oid
        if uploaded.is_file():
            return uploaded
        if not self.exists(repo):
            return None
        head = self.commits(repo)[-1]
        for path, recorded in head.files.items():
            if recorded["sha256"] == oid:
                return self.folder(repo) / REVISIONS_DIR / head.id / path
        return None

    def apply_commit(self, repo: str, revision: str, commit: Commit) -> DatasetCommit:
        """Check, stage and store one commit to main as a new immutable revision."""
        if revision != LIVE_BRANCH:
            raise HubError(
                404,
                f"datasets/{repo}: commit to main; a dataset repo on a loraflow hub has no other branch.",
                "RevisionNotFound",
            )
        if len(commit.changes) > MAX_FILES:
            raise HubError(413, f"a commit takes at most {MAX_FILES} operations, not {len(commit.changes)}.")
        for change in commit.changes:
            if len(change.path) > MAX_PATH_CHARS:
                raise HubError(422, f"{change.path[:60]}...: paths are at most {MAX_PATH_CHARS} characters.")
        self.commits(repo)  # a repo nobody created is a 404 before anything is written
        with self._locked(repo):
            history = self.commits(repo)
            head = history[-1]
            parent = commit.header.parentCommit
            if parent and parent != head.id:
                raise HubError(412, f"datasets/{repo}@main is at {head.id}, not at parent commit {parent}; retry.")
            sources = {change.oid: self.blob_path(repo, change.oid) for change in commit.changes if change.oid}
            check_lfs_sources(commit.changes, sources)
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.folder(repo)))
            try:
                self._link_tree(self.folder(repo) / REVISIONS_DIR / head.id, staging, head.files)
                for change in commit.changes:
                    apply_change(staging, change, sources.get(change.oid))
                changed = {change.path for change in commit.changes if change.action in ("write", "lfs")}
                files = self._manifest_of(staging, head.files, changed)
                summary = commit.header.summary or "commit"
                created = self._new_commit(head.id, summary, files)
                revisions = self.folder(repo) / REVISIONS_DIR
                revisions.mkdir(exist_ok=True)
                os.rename(staging, revisions / created.id)
                self._write_manifest(repo, [*history, created])
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        remove_spent_uploads(sources, self.uploads)
        return created

    @staticmethod
    def _link_tree(source: Path, staging: Path, files: dict[str, dict]) -> None:
        for relative in files:
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source / relative, target)  # revisions never change, so sharing the inode is safe
            except OSError:
                shutil.copyfile(source / relative, target)

    @staticmethod
    def _manifest_of(staging: Path, previous: dict[str, dict], changed: set[str]) -> dict[str, dict]:
        files = {}
        for path in sorted(staging.rglob("*")):
            if path.is_symlink():
                raise HubError(422, f"{path.relative_to(staging)}: links are not allowed in a dataset repo.")
            if not path.is_file():
                continue
            relative = path.relative_to(staging).as_posix()
            if relative in previous and relative not in changed:
                files[relative] = previous[relative]
            else:
                files[relative] = {
                    "size": path.stat().st_size,
                    "sha256": sha256_file(path),
                    "blob_id": git_blob_id(path),
                }
            if len(files) > MAX_FILES:
                raise HubError(413, f"a dataset repo holds at most {MAX_FILES} files.")
        return files

    @staticmethod
    def _new_commit(parent: str | None, summary: str, files: dict[str, dict]) -> DatasetCommit:
        created = now()
        payload = json.dumps(
            {"parent": parent, "summary": summary, "created": created, "files": files, "nonce": os.urandom(8).hex()},
            sort_keys=True,
        )
        return DatasetCommit(hashlib.sha1(payload.encode()).hexdigest(), parent, summary, created, files)

    def _write_manifest(self, repo: str, commits: list[DatasetCommit]) -> None:
        manifest = self.folder(repo) / MANIFEST
        text = json.dumps({"schema": MANIFEST_SCHEMA, "commits": [asdict(commit) for commit in commits]}, indent=1)
        descriptor, temporary = tempfile.mkstemp(prefix=f".{MANIFEST}-", dir=manifest.parent)
        try:
            with os.fdopen(descriptor, "w") as stream:
                stream.write(text)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, manifest)
        finally:
            Path(temporary).unlink(missing_ok=True)
