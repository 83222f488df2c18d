"""A serving replica's view of a registry served by `loraflow hub serve` at a URL.

`loraflow serve --registry http://HOST:PORT` (or LORAFLOW_REGISTRY=http://...) makes every replica read one
registry over HTTP instead of a shared file:
- the metadata (names, versions, aliases, sha256s, bases) is mirrored from `/api/loraflow/registry`; a
  background thread polls it every LORAFLOW_REGISTRY_POLL_S seconds (0.5) with If-None-Match, so a quiet
  registry costs one bodiless 304 per poll and a publish reaches every replica within one poll;
- an adapter version is downloaded through the Hub routes (huggingface_hub's snapshot_download, once per
  version, into the loraflow cache) when a request first needs it; the resolver then checks it like a local
  one (inside the cache, safetensors only, sha256 against the mirrored registry, base fingerprint);
- if the hub becomes unreachable, the replica keeps serving what it last mirrored and logs the failure;
- the download cache is bounded (LORAFLOW_ADAPTER_CACHE_GB, default 5): after each fetch the least recently used
  versions are deleted until the rest fit, sparing any version the server still holds (`in_use`) and any folder
  used or written in the last IN_USE_GRACE_S (600) seconds (a download under way, or another replica's use).
Read tokens come from huggingface_hub's usual settings (HF_TOKEN), as for any Hub client.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import httpx

from loraflow.hub.errors import LoraflowError
from loraflow.hub.registry import AdapterVersion, RegistrySnapshot
from loraflow.serve.naming import env_limit

logger = logging.getLogger("loraflow.remote_registry")
METADATA_ROUTE = "/api/loraflow/registry"
ADAPTER_CACHE_ENV = "LORAFLOW_ADAPTER_CACHE_GB"
# 60 to 150 rank-16 adapters of a 7B-class base (35-80 MB each), beside the base itself on a replica's disk.
DEFAULT_ADAPTER_CACHE_GB = 5.0
# Longer than an adapter's download: a folder written or used more recently may be a download under way elsewhere.
IN_USE_GRACE_S = 600.0


def adapter_cache_gb() -> float:
    """The download cache's size limit (LORAFLOW_ADAPTER_CACHE_GB, default 5; 0 keeps only what is in use)."""
    return env_limit(ADAPTER_CACHE_ENV, DEFAULT_ADAPTER_CACHE_GB, whole=False, minimum=0)


class RemoteRegistry:
    """A registry view (`snapshot()`, `folder()`) answered from a mirrored copy of a remote registry."""

    def __init__(
        self, url: str, poll_s: float | None = None, cache_dir: Path | None = None, cache_bytes: int | None = None
    ):
        from loraflow.hub.base import cache_dir as loraflow_cache

        self.url = url.rstrip("/")
        self.poll_s = poll_s if poll_s is not None else float(os.environ.get("LORAFLOW_REGISTRY_POLL_S", "0.5"))
        self.cache = Path(cache_dir or loraflow_cache() / "hub")
        self.cache_bytes = cache_bytes if cache_bytes is not None else int(adapter_cache_gb() * 1e9)
        self.in_use: Callable[[], Iterable[str]] = frozenset  # folders the server still holds; the resolver sets it
        self._prune_lock = threading.Lock()
        self._snapshot: RegistrySnapshot | None = None
        self._etag: str | None = None
        self._poller: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.stopped = threading.Event()
        self.reachable = True  # the last poll's outcome

    @property
    def store(self) -> Path:
        return self.cache

    @property
    def location(self) -> str:
        return self.url

    def snapshot(self) -> RegistrySnapshot:
        """The mirrored registry; poll_s=0 fetches on every call instead of polling in the background."""
        if self._snapshot is None or self.poll_s <= 0:
            self.refresh()
        if self._poller is None and self.poll_s > 0:
            with self._start_lock:
                if self._poller is None:
                    self._poller = threading.Thread(target=self._poll, name="loraflow-registry-poll", daemon=True)
                    self._poller.start()
        return self._snapshot

    def refresh(self) -> None:
        """Fetch the metadata unless it is unchanged since the last fetch (ETag = registry revision)."""
        from huggingface_hub import get_token

        headers = {"If-None-Match": self._etag} if self._etag else {}
        token = get_token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            response = httpx.get(self.url + METADATA_ROUTE, headers=headers, timeout=10)
        except httpx.HTTPError as error:
            raise LoraflowError(
                f"registry {self.url}: cannot reach it ({error}). Start `loraflow hub serve` there, or fix --registry."
            ) from None
        if response.status_code == 304:
            return
        if response.status_code in (401, 403):
            raise LoraflowError(
                f"registry {self.url}: {response.status_code}, this hub is private; set HF_TOKEN to a read token."
            )
        if response.status_code != 200:
            raise LoraflowError(
                f"registry {self.url}: {METADATA_ROUTE} answered {response.status_code}; is this a `loraflow hub "
                "serve` endpoint?"
            )
        self._snapshot = RegistrySnapshot.parse(response.text, self.url + METADATA_ROUTE)
        self._etag = response.headers.get("etag")

    def _poll(self) -> None:
        while not self.stopped.wait(self.poll_s):
            try:
                self.refresh()
                if not self.reachable:
                    logger.warning("registry %s reachable again", self.url)
                self.reachable = True
            except LoraflowError as error:
                if self.reachable:
                    logger.warning("%s; serving the registry as last mirrored", error)
                self.reachable = False

    def folder(self, version: AdapterVersion) -> Path:
        """The version's local copy, downloaded if missing; marks it used now and prunes the cache to its limit."""
        from loraflow.hub.hf import pull_to_cache

        folder = pull_to_cache(self.url, version.name, f"v{version.version}", cache_dir=self.cache)
        os.utime(folder)  # the folder's mtime is its last use, which pruning orders by
        with self._prune_lock:
            prune_cache(self.cache, self.cache_bytes, {os.path.realpath(folder), *self.in_use()})
        return folder


def _cached_versions(cache: Path) -> list[tuple[float, int, Path]]:
    """(last use, bytes, folder) for every version folder in a huggingface_hub cache (models--*/snapshots/*)."""
    versions = []
    for snapshot in cache.glob("models--*/snapshots/*"):
        try:
            last_use = snapshot.stat().st_mtime
            size = sum(path.stat().st_size for path in snapshot.rglob("*") if path.is_file())
        except FileNotFoundError:
            continue  # pruned meanwhile by another replica sharing the cache
        versions.append((last_use, size, snapshot))
    return sorted(versions, key=lambda entry: entry[0])


def prune_cache(cache: Path, max_bytes: int, keep: Iterable[str] = ()) -> list[Path]:
    """Delete the least recently used version folders until the cache fits max_bytes; return the deleted folders.

    Never deletes a folder in `keep` (real paths) or one used or written in the last IN_USE_GRACE_S seconds, so the
    cache may stay above its limit while everything in it is in use.
    """
    keep = {os.path.realpath(path) for path in keep}
    versions = _cached_versions(cache)
    total = sum(size for _, size, _ in versions)
    recent = time.time() - IN_USE_GRACE_S
    deleted = []
    for last_use, size, snapshot in versions:
        if total <= max_bytes:
            break
        if last_use > recent or os.path.realpath(snapshot) in keep:
            continue
        _delete_version(snapshot)
        total -= size
        deleted.append(snapshot)
    if deleted:
        logger.info("adapter cache %s: deleted %d least recently used versions", cache, len(deleted))
    return deleted


def _delete_version(snapshot: Path) -> None:
    """Delete one version folder, the blobs no other version of its repo links to, and refs naming it."""
    repo = snapshot.parent.parent
    shutil.rmtree(snapshot, ignore_errors=True)
    linked = {os.path.realpath(path) for path in repo.glob("snapshots/*/**/*")}
    recent = time.time() - IN_USE_GRACE_S
    for blob in repo.glob("blobs/*"):
        try:
            # A young blob may be a download another process is about to link into its version folder.
            if blob.suffix != ".incomplete" and os.path.realpath(blob) not in linked and blob.stat().st_mtime < recent:
                blob.unlink()
        except FileNotFoundError:
            pass
    for ref in repo.glob("refs/**/*"):
        try:
            if ref.is_file() and ref.read_text().strip() == snapshot.name:
                ref.unlink()
        except FileNotFoundError:
            pass
    for folder in (repo / "snapshots", repo / "blobs", repo / "refs", repo):
        try:
            folder.rmdir()  # only when empty: another process may be downloading into this repo
        except OSError:
            pass
