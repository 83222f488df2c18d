"""A serving replica's view of a registry served by `loraflow hub serve` at a URL.

`loraflow serve --registry http://HOST:PORT` (or LORAFLOW_REGISTRY=http://...) makes every replica read one
registry over HTTP instead of a shared file:
- the metadata (names, versions, aliases, sha256s, bases) is mirrored from `/api/loraflow/registry`; a
  background thread polls it every LORAFLOW_REGISTRY_POLL_S seconds (0.5) with If-None-Match, so a quiet
  registry costs one bodiless 304 per poll and a publish reaches every replica within one poll;
- an adapter version is downloaded through the Hub routes (huggingface_hub's snapshot_download, once per
  version, into the loraflow cache) when a request first needs it; the resolver then checks it like a local
  one (inside the cache, safetensors only, sha256 against the mirrored registry, base fingerprint);
- if the hub becomes unreachable, the replica keeps serving what it last mirrored and logs the failure.
Read tokens come from huggingface_hub's usual settings (HF_TOKEN), as for any Hub client.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import httpx

from loraflow.hub.errors import LoraflowError
from loraflow.hub.registry import AdapterVersion, RegistrySnapshot

logger = logging.getLogger("loraflow.remote_registry")
METADATA_ROUTE = "/api/loraflow/registry"


class RemoteRegistry:
    """A registry view (`snapshot()`, `folder()`) answered from a mirrored copy of a remote registry."""

    def __init__(self, url: str, poll_s: float | None = None, cache_dir: Path | None = None):
        from loraflow.hub.base import cache_dir as loraflow_cache

        self.url = url.rstrip("/")
        self.poll_s = poll_s if poll_s is not None else float(os.environ.get("LORAFLOW_REGISTRY_POLL_S", "0.5"))
        self.cache = Path(cache_dir or loraflow_cache() / "hub")
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
        from loraflow.hub.hf import pull_to_cache

        return pull_to_cache(self.url, version.name, f"v{version.version}", cache_dir=self.cache)
