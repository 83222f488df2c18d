"""What the model and dataset routers share: error responses, JSON bodies, query flags, Hub times, file trees
and the LFS batch answer. Nothing here knows whether a repo holds an adapter or a dataset."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel as Schema
from pydantic import ConfigDict, Field, ValidationError

from loraflow.hub.hub_server.repos import LFS_POINTER_SIZE, SHA256, UPLOAD_URL_LIFETIME_S, HubError, describe_validation

LFS_UPLOAD_PREFIX = "/api/loraflow/lfs/"


def error_response(error: HubError) -> JSONResponse:
    # Headers must be latin-1 and one line; the JSON body keeps the full text.
    header_message = error.message.encode("ascii", "replace").decode().replace("\n", " ")
    headers = {"X-Error-Message": header_message}
    if error.code:
        headers["X-Error-Code"] = error.code
    return JSONResponse({"error": error.message}, status_code=error.status, headers=headers)


def json_body(schema: type[Schema]):
    """A dependency that reads the body as `schema`; anything else is a 400 that says which field is wrong."""

    async def read(request: Request):
        body = await request.body()
        try:
            return schema.model_validate_json(body or b"{}")
        except ValidationError as error:
            raise HubError(400, f"{request.url.path}: bad JSON body: {describe_validation(error)}.") from None

    return Depends(read)


class RequestBody(Schema):
    # Clients send fields this hub has no use for (visibility, sample, gitIgnore, hash_algo ...): ignore those.
    model_config = ConfigDict(extra="ignore")


class PreuploadFile(RequestBody):
    path: str
    size: int = Field(ge=0)


class PreuploadBody(RequestBody):
    files: list[PreuploadFile] = []


class LfsObject(RequestBody):
    oid: str
    size: int = Field(ge=0)


class LfsBatchBody(RequestBody):
    operation: str
    transfers: list[str] = ["basic"]
    objects: list[LfsObject] = []


def flag(request: Request, key: str) -> bool:
    return request.query_params.get(key) in ("1", "true", "True")


def hub_time(iso: str) -> str:
    """An ISO time in the Hub's format, which huggingface_hub parses strictly."""
    return datetime.fromisoformat(iso).astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def blob_fields(entry: dict) -> dict:
    """A file entry (path, size, sha256, oid, lfs) as the `siblings` of a repo info with blobs=true."""
    lfs = {"size": entry["size"], "sha256": entry["sha256"], "pointerSize": LFS_POINTER_SIZE} if entry["lfs"] else None
    return {"size": entry["size"], "blobId": entry["oid"], "lfs": lfs}


def tree(entries: list[dict], folder: str, recursive: bool, where: str) -> list[dict]:
    """The Hub's tree listing of `folder` from a revision's file entries: folders first, then files."""
    prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
    files, folders = [], set()
    for entry in entries:
        if not entry["path"].startswith(prefix):
            continue
        rest = entry["path"][len(prefix) :]
        if "/" in rest and not recursive:
            folders.add(prefix + rest.split("/", 1)[0])
            continue
        if recursive:
            parts = PurePosixPath(rest).parts[:-1]
            folders.update(prefix + "/".join(parts[: depth + 1]) for depth in range(len(parts)))
        item = {"type": "file", "path": entry["path"], "size": entry["size"], "oid": entry["oid"]}
        if entry["lfs"]:
            item["lfs"] = entry["lfs"]
        files.append(item)
    if prefix and not files and not folders:
        raise HubError(404, f"{where}: no folder {folder!r}.", "EntryNotFound")
    directories = [
        {"type": "directory", "path": path, "oid": hashlib.sha1(path.encode()).hexdigest()} for path in sorted(folders)
    ]
    return directories + files


def lfs_batch_answer(
    request: Request, payload: LfsBatchBody, have: Callable[[str], bool], sign: Callable[[str, int], tuple[int, str]]
) -> dict:
    """The LFS batch endpoint's answer: objects the hub `have`s need nothing, the others get a signed upload URL."""
    if payload.operation != "upload":
        raise HubError(400, "this loraflow hub's LFS endpoint takes uploads only; download files with resolve/.")
    if "basic" not in payload.transfers:
        raise HubError(400, "this loraflow hub offers the 'basic' LFS transfer only.")
    base_url = str(request.base_url).rstrip("/")
    objects = []
    for item in payload.objects:
        oid, size = item.oid, item.size
        if not SHA256.match(oid):
            objects.append({"oid": oid, "size": size, "error": {"code": 422, "message": "oid must be a sha256"}})
            continue
        if have(oid):
            objects.append({"oid": oid, "size": size})
            continue
        expires, signature = sign(oid, size)
        href = f"{base_url}{LFS_UPLOAD_PREFIX}{oid}?size={size}&expires={expires}&signature={signature}"
        upload = {"href": href, "expires_in": UPLOAD_URL_LIFETIME_S}
        objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {"upload": upload}})
    return {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}


def card_data(readme: Path | None, card_class) -> dict | None:
    """The metadata of a model or dataset card (`card_class` is ModelCard or DatasetCard), or None."""
    if readme is None or not readme.is_file():
        return None
    try:
        return card_class.load(readme).data.to_dict()
    except Exception:  # a hand-written card without valid metadata still serves its files
        return None
