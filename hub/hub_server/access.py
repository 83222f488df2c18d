"""Who may read and write a loraflow hub: tokens from the environment and a token file, and the FastAPI
dependencies (`require_read`, `require_write`) that the routers put in front of their routes."""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request

from loraflow.hub.errors import LoraflowError
from loraflow.hub.hub_server.repos import HubError

TOKEN_ENV = "LORAFLOW_HUB_TOKEN"


@dataclass(frozen=True)
class HubAccess:
    """Who may read and write. Writes always need a write token; reads need one only when private."""

    write_tokens: frozenset[str]
    read_tokens: frozenset[str]
    private: bool = False

    @classmethod
    def load(cls, token_file: Path | None = None, private: bool = False) -> HubAccess:
        """Tokens from LORAFLOW_HUB_TOKEN (a write token) and a file of `TOKEN [read|write]` lines."""
        write, read = set(), set()
        if os.environ.get(TOKEN_ENV):
            write.add(os.environ[TOKEN_ENV].strip())
        if token_file is not None:
            path = Path(token_file)
            if not path.is_file():
                raise LoraflowError(
                    f"{path}: no such token file. Write one token per line, optionally followed by 'read'."
                )
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                fields = line.split("#", 1)[0].split()
                if not fields:
                    continue
                role = fields[1] if len(fields) > 1 else "write"
                if len(fields) > 2 or role not in ("read", "write"):
                    raise LoraflowError(f"{path}:{number}: expected 'TOKEN' or 'TOKEN read' or 'TOKEN write'.")
                (read if role == "read" else write).add(fields[0])
        if private and not (write or read):
            raise LoraflowError(f"--private needs tokens: set {TOKEN_ENV} or pass --tokens FILE.")
        return cls(frozenset(write), frozenset(read), private)

    def role(self, token: str | None) -> str | None:
        if token is None:
            return None
        if any(hmac.compare_digest(token, known) for known in self.write_tokens):
            return "write"
        if any(hmac.compare_digest(token, known) for known in self.read_tokens):
            return "read"
        return "invalid"


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def require_read(request: Request) -> None:
    """Reads are public unless the hub is private; then any valid token may read."""
    access: HubAccess = request.app.state.access
    if not access.private:
        return  # public reads ignore tokens: clients send their huggingface.co token to any endpoint
    role = access.role(bearer_token(request))
    if role == "invalid":
        raise HubError(401, "Invalid credentials in Authorization header")
    if role is None:
        raise HubError(401, "this loraflow hub is private: send a token (set HF_TOKEN).")


def require_write(request: Request) -> None:
    role = request.app.state.access.role(bearer_token(request))
    if role is None:
        raise HubError(401, "writing to this loraflow hub needs a write token: set HF_TOKEN.")
    if role == "invalid":
        raise HubError(401, "Invalid credentials in Authorization header")
    if role != "write":
        raise HubError(403, "this token may only read; writing needs a write token.")
