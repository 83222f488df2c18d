"""A `loraflow hub serve` subprocess for tests: the hub server tests and the serving replicas that read it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from loraflow.hub.registry import Registry
from tests.conftest import REPO

WRITE_TOKEN = "hf_loraflow_test_write_token"
READ_TOKEN = "hf_loraflow_test_read_token"
INLINE_LIMIT_MB = "0.004"  # about 4 KB: the tiny adapter's weights go through LFS, its JSON inline


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class HubServer:
    """A `loraflow hub serve` subprocess with its registry, endpoint and log."""

    def __init__(self, root: Path, base_path: Path, *extra: str):
        self.root = root
        self.registry = Registry(root / "registry.json")
        self.endpoint = f"http://127.0.0.1:{_free_port()}"
        tokens = root / "tokens.txt"
        tokens.write_text(f"{WRITE_TOKEN}\n{READ_TOKEN} read\n")
        self.log = open(root / "server.log", "w")
        port = self.endpoint.rsplit(":", 1)[1]
        command = [sys.executable, "-m", "loraflow.hub.cli", "--registry", str(self.registry.path), "hub", "serve"]
        self.process = subprocess.Popen(
            [
                *command,
                "--port",
                port,
                "--base",
                str(base_path),
                "--tokens",
                str(tokens),
                "--inline-limit-mb",
                INLINE_LIMIT_MB,
                *extra,
            ],
            cwd=REPO,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "LORAFLOW_HUB_TOKEN": ""},
        )
        self._wait_ready()

    def _wait_ready(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"hub serve exited with {self.process.returncode}:\n{self.log_text()}")
            try:
                if httpx.get(f"{self.endpoint}/api/loraflow/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"hub serve did not answer within {timeout_s}s:\n{self.log_text()}")

    def log_text(self) -> str:
        self.log.flush()
        return (self.root / "server.log").read_text()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()

    def __enter__(self) -> HubServer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def hub_api(server: HubServer, patch: pytest.MonkeyPatch):
    """An HfApi with the write token for `server`. The hub speaks the classic LFS API, not Xet: `patch` sets what
    HF_HUB_DISABLE_XET=1 sets at import time, until the test (or the fixture holding `patch`) ends."""
    import huggingface_hub.constants
    from huggingface_hub import HfApi

    patch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    return HfApi(endpoint=server.endpoint, token=WRITE_TOKEN)
