"""The FastAPI app: the Hub HTTP routes huggingface_hub calls, over HubRepos, and the uvicorn runner."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response

from hub.base import BaseModel
from hub.errors import LoraflowError
from hub.hf import card_metadata
from hub.hub_server.access import HubAccess
from hub.hub_server.repos import (
    INLINE_MAX_BYTES,
    LFS_POINTER_SIZE,
    NAMESPACE,
    UPLOAD_URL_LIFETIME_S,
    VERSION_BRANCH,
    HubError,
    HubRepos,
    commit_id,
    git_blob_id,
    safe_relative,
)
from hub.registry import NAME_PATTERN, AdapterVersion, Registry


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def _error_response(error: HubError) -> JSONResponse:
    # Headers must be latin-1 and one line; the JSON body keeps the full text.
    header_message = error.message.encode("ascii", "replace").decode().replace("\n", " ")
    headers = {"X-Error-Message": header_message}
    if error.code:
        headers["X-Error-Code"] = error.code
    return JSONResponse({"error": error.message}, status_code=error.status, headers=headers)


def create_app(registry: Registry, base: BaseModel, access: HubAccess, inline_max_bytes: int = INLINE_MAX_BYTES) -> FastAPI:
    """The FastAPI app. One process may serve many readers and writers; the registry's file lock orders writes."""
    repos = HubRepos(registry, base, inline_max_bytes)
    app = FastAPI(title="loraflow hub", summary="The loraflow adapter registry over the Hugging Face Hub API.")
    app.state.repos = repos

    @app.exception_handler(HubError)
    async def hub_error(request: Request, error: HubError):
        return _error_response(error)

    @app.exception_handler(LoraflowError)
    async def loraflow_error(request: Request, error: LoraflowError):
        return _error_response(HubError(400, str(error)))

    def need_read(request: Request) -> None:
        if not access.private:
            return  # public reads ignore tokens: clients send their huggingface.co token to any endpoint
        role = access.role(_bearer(request))
        if role == "invalid":
            raise HubError(401, "Invalid credentials in Authorization header")
        if role is None:
            raise HubError(401, "this loraflow hub is private: send a token (set HF_TOKEN).")

    def need_write(request: Request) -> None:
        role = access.role(_bearer(request))
        if role is None:
            raise HubError(401, "writing to this loraflow hub needs a write token: set HF_TOKEN.")
        if role == "invalid":
            raise HubError(401, "Invalid credentials in Authorization header")
        if role != "write":
            raise HubError(403, "this token may only read; writing needs a write token.")

    def repo_url(request: Request, name: str) -> str:
        return f"{str(request.base_url).rstrip('/')}/{NAMESPACE}/{name}"

    @app.get("/api/loraflow/health")
    def health():
        return {"status": "ok", "registry_revision": registry.revision, "namespace": NAMESPACE}

    @app.get("/api/loraflow/registry")
    def registry_metadata(request: Request):
        """The registry's metadata (names, versions, aliases, sha256s, bases), for serving replicas to mirror.

        Its ETag is the registry revision, so a replica polling with If-None-Match gets a bodiless 304 until a
        publish. The adapter files themselves are fetched through the Hub routes and checked against the sha256s.
        """
        need_read(request)
        data = registry.load()
        etag = f'"{data.get("revision", 0)}"'
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers={"ETag": etag})
        return JSONResponse(data, headers={"ETag": etag, "Cache-Control": "no-cache"})

    @app.get("/api/whoami-v2")
    def whoami(request: Request):
        role = access.role(_bearer(request))
        if role in (None, "invalid"):
            raise HubError(401, "Invalid credentials in Authorization header")
        return {"type": "user", "name": f"loraflow-{role}", "auth": {"accessToken": {"role": role}}, "orgs": []}

    @app.post("/api/validate-yaml")
    async def validate_yaml(request: Request):
        from huggingface_hub import RepoCard

        payload = await request.json()
        try:
            RepoCard(str(payload.get("content", "")))
        except Exception as error:  # RepoCard raises ValueError or a YAML error for bad metadata
            return JSONResponse({"errors": [{"message": str(error)}], "warnings": []}, status_code=400)
        return {"errors": [], "warnings": []}

    def model_info(request: Request, namespace: str, name: str, revision: str) -> dict:
        need_read(request)
        name = repos.repo_name(namespace, name)
        version = repos.resolve(name, revision)
        files = repos.files(version)
        card = card_metadata(registry.folder(version))
        with_blobs = request.query_params.get("blobs") in ("1", "true", "True")
        siblings = [
            {"rfilename": f["path"], **({"size": f["size"], "blobId": f["oid"], "lfs": _sibling_lfs(f)} if with_blobs else {})}
            for f in files
        ]
        return {
            "_id": commit_id(version),
            "id": f"{NAMESPACE}/{name}",
            "modelId": f"{NAMESPACE}/{name}",
            "author": NAMESPACE,
            "sha": commit_id(version),
            "lastModified": _hub_time(version.created),
            "createdAt": _hub_time(repos.versions(name)[0].created),
            "private": access.private,
            "gated": False,
            "disabled": False,
            "library_name": "peft",
            "pipeline_tag": "text-generation",
            "tags": ["peft", "lora", "loraflow", version.trainer.get("name", "upload")],
            "cardData": _card_data(registry.folder(version) / "README.md"),
            "siblings": siblings,
            "loraflow": {
                "version": version.version,
                "aliases": {alias: number for alias, number in registry.aliases(name).items()},
                "files": version.files,
                "base": version.base,
                "metrics": version.metrics,
                "lineage": card.get("lineage", []),
            },
        }

    @app.get("/api/models/{namespace}/{name}")
    def model_info_main(request: Request, namespace: str, name: str):
        return model_info(request, namespace, name, "main")

    @app.get("/api/models/{namespace}/{name}/revision/{revision}")
    def model_info_revision(request: Request, namespace: str, name: str, revision: str):
        return model_info(request, namespace, name, revision)

    def tree(request: Request, namespace: str, name: str, revision: str, folder: str) -> list[dict]:
        need_read(request)
        name = repos.repo_name(namespace, name)
        version = repos.resolve(name, revision)
        recursive = request.query_params.get("recursive") in ("1", "true", "True")
        prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
        entries, folders = [], set()
        for entry in repos.files(version):
            if not entry["path"].startswith(prefix):
                continue
            rest = entry["path"][len(prefix):]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/", 1)[0])
                continue
            if recursive:
                parts = PurePosixPath(rest).parts[:-1]
                folders.update(prefix + "/".join(parts[: depth + 1]) for depth in range(len(parts)))
            item = {"type": "file", "path": entry["path"], "size": entry["size"], "oid": entry["oid"]}
            if entry["lfs"]:
                item["lfs"] = entry["lfs"]
            entries.append(item)
        if prefix and not entries and not folders:
            raise HubError(404, f"{NAMESPACE}/{name}@{revision}: no folder {folder!r}.", "EntryNotFound")
        directories = [{"type": "directory", "path": path, "oid": hashlib.sha1(path.encode()).hexdigest()} for path in sorted(folders)]
        return directories + entries

    @app.get("/api/models/{namespace}/{name}/tree/{revision}")
    def tree_root(request: Request, namespace: str, name: str, revision: str):
        return tree(request, namespace, name, revision, "")

    @app.get("/api/models/{namespace}/{name}/tree/{revision}/{folder:path}")
    def tree_folder(request: Request, namespace: str, name: str, revision: str, folder: str):
        return tree(request, namespace, name, revision, folder)

    @app.get("/api/models/{namespace}/{name}/refs")
    def refs(request: Request, namespace: str, name: str):
        need_read(request)
        name = repos.repo_name(namespace, name)
        versions = {v.version: v for v in repos.versions(name)}
        latest = registry.get(f"{name}@latest")

        def branch(branch_name: str, version: AdapterVersion) -> dict:
            return {"name": branch_name, "ref": f"refs/heads/{branch_name}", "targetCommit": commit_id(version)}

        branches = [branch("main", latest)]
        branches += [branch(f"v{number}", version) for number, version in sorted(versions.items())]
        branches += [branch(alias, versions[number]) for alias, number in sorted(registry.aliases(name).items()) if alias != "latest"]
        return {"branches": branches, "tags": [], "converts": []}

    @app.api_route("/{namespace}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
    def resolve_file(request: Request, namespace: str, name: str, revision: str, path: str):
        need_read(request)
        name = repos.repo_name(namespace, name)
        version = repos.resolve(name, revision)
        relative = safe_relative(path)
        digest = version.files.get(relative)
        if digest is None:
            raise HubError(404, f"{NAMESPACE}/{name}@{revision} has no file {relative!r}.", "EntryNotFound")
        headers = {"ETag": f'"{digest}"', "X-Repo-Commit": commit_id(version), "Cache-Control": "no-cache"}
        return FileResponse(registry.folder(version) / relative, headers=headers, media_type="application/octet-stream")

    @app.post("/api/repos/create")
    async def create_repo(request: Request):
        need_write(request)
        payload = await request.json()
        if payload.get("type", "model") not in ("model", None):
            raise HubError(400, "a loraflow hub holds model repos only.")
        name = repos.repo_name(payload.get("organization") or NAMESPACE, str(payload.get("name", "")))
        url = repo_url(request, name)
        if repos.exists(name):
            return JSONResponse({"error": "You already created this model repo", "url": url}, status_code=409)
        return {"url": url, "name": f"{NAMESPACE}/{name}"}

    @app.post("/api/models/{namespace}/{name}/preupload/{revision}")
    async def preupload(request: Request, namespace: str, name: str, revision: str):
        need_write(request)
        name = repos.repo_name(namespace, name)
        payload = await request.json()
        current, folder = {}, None
        match = VERSION_BRANCH.match(revision)
        if repos.exists(name) and not (match and int(match.group(1)) == repos.next_version(name)):
            version = repos.resolve(name, revision)
            current, folder = {entry["path"]: entry for entry in repos.files(version)}, registry.folder(version)
        answers = []
        for item in payload.get("files", []):
            path = safe_relative(item.get("path", ""))
            mode = "lfs" if int(item.get("size", 0)) > inline_max_bytes else "regular"
            remote = current.get(path)
            oid = None
            if remote:
                oid = remote["sha256"] if mode == "lfs" else git_blob_id(folder / path)
            answers.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return {"files": answers, "commitOid": None}

    @app.post("/{namespace}/{repo_git}/info/lfs/objects/batch")
    async def lfs_batch(request: Request, namespace: str, repo_git: str):
        need_write(request)
        repos.repo_name(namespace, repo_git.removesuffix(".git"))
        payload = await request.json()
        if payload.get("operation") != "upload":
            raise HubError(400, "this loraflow hub's LFS endpoint takes uploads only; download files with resolve/.")
        if "basic" not in payload.get("transfers", ["basic"]):
            raise HubError(400, "this loraflow hub offers the 'basic' LFS transfer only.")
        objects = []
        for item in payload.get("objects", []):
            oid, size = str(item.get("oid", "")), int(item.get("size", 0))
            if not re.fullmatch(r"[0-9a-f]{64}", oid):
                objects.append({"oid": oid, "size": size, "error": {"code": 422, "message": "oid must be a sha256"}})
                continue
            if repos.blob_path(oid) is not None:
                objects.append({"oid": oid, "size": size})
                continue
            expires, signature = repos.sign_upload(oid, size)
            href = f"{str(request.base_url).rstrip('/')}/api/loraflow/lfs/{oid}?size={size}&expires={expires}&signature={signature}"
            objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {"upload": {"href": href, "expires_in": UPLOAD_URL_LIFETIME_S}}})
        return {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}

    @app.put("/api/loraflow/lfs/{oid}")
    async def lfs_upload(request: Request, oid: str, size: int, expires: int, signature: str):
        repos.check_upload_signature(oid, size, expires, signature)
        objects = repos.uploads / "objects"
        objects.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(prefix=".part-", dir=objects)
        digest, received = hashlib.sha256(), 0
        try:
            with os.fdopen(descriptor, "wb") as stream:
                async for chunk in request.stream():
                    digest.update(chunk)
                    received += len(chunk)
                    stream.write(chunk)
            if digest.hexdigest() != oid or received != size:
                raise HubError(400, f"uploaded object does not match: expected sha256 {oid} and {size} bytes, got {digest.hexdigest()} and {received}.")
            os.replace(temporary, objects / oid)
        finally:
            Path(temporary).unlink(missing_ok=True)
        return {"oid": oid, "size": size}

    @app.post("/api/models/{namespace}/{name}/commit/{revision}")
    async def commit(request: Request, namespace: str, name: str, revision: str):
        need_write(request)
        name = repos.repo_name(namespace, name)
        if request.query_params.get("create_pr") in ("1", "true", "True"):
            raise HubError(400, "a loraflow hub has no pull requests; commit to main or to the next vN.")
        lines = [json.loads(line) for line in (await request.body()).splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "a commit starts with a header line (key 'header').")
        version = await run_in_threadpool(repos.apply_commit, name, revision, lines[0].get("value") or {}, lines[1:])
        oid = commit_id(version)
        return {"commitUrl": f"{repo_url(request, name)}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None, "loraflowVersion": version.version}

    @app.post("/api/models/{namespace}/{name}/branch/{branch}")
    async def create_branch(request: Request, namespace: str, name: str, branch: str):
        need_write(request)
        name = repos.repo_name(namespace, name)
        payload = await request.json() if await request.body() else {}
        match = VERSION_BRANCH.match(branch)
        if match:
            upcoming = repos.next_version(name)
            if int(match.group(1)) == upcoming:
                return {}
            if int(match.group(1)) < upcoming:
                raise HubError(409, f"{NAMESPACE}/{name}: branch {branch} already exists.")
            raise HubError(409, f"{NAMESPACE}/{name}: the next version is v{upcoming}, not {branch}; this hub numbers versions itself.")
        return _make_alias(name, branch, payload.get("startingPoint") or "main")

    @app.post("/api/models/{namespace}/{name}/tag/{revision}")
    async def create_tag(request: Request, namespace: str, name: str, revision: str):
        need_write(request)
        name = repos.repo_name(namespace, name)
        payload = await request.json()
        tag = str(payload.get("tag", ""))
        match = VERSION_BRANCH.match(tag)
        if match:
            version = repos.resolve(name, revision)
            if version.version == int(match.group(1)):
                raise HubError(409, f"{NAMESPACE}/{name}: {tag} already names this version.")
            raise HubError(409, f"{NAMESPACE}/{name}: {revision} is v{version.version}, so it cannot be tagged {tag}.")
        return _make_alias(name, tag, revision)

    def _make_alias(name: str, alias: str, revision: str) -> dict:
        repos.versions(name)
        if alias == "main" or alias in registry.aliases(name):
            raise HubError(409, f"{NAMESPACE}/{name}: {alias} already exists.")
        if not NAME_PATTERN.match(alias):
            raise HubError(400, f"{alias!r} is not a valid alias: use lowercase letters, digits, '.', '_' or '-'.")
        version = repos.resolve(name, revision)
        registry.set_alias(version.ref, alias)
        return {}

    @app.api_route("/api/models/{namespace}/{name}/xet-{kind}-token/{revision}", methods=["GET", "POST"])
    def xet_token(namespace: str, name: str, kind: str, revision: str):
        raise HubError(
            501,
            "this loraflow hub does not speak the Xet protocol: set HF_HUB_DISABLE_XET=1 in the uploading client "
            f"(files over {inline_max_bytes} bytes go through the LFS API).",
        )

    return app


def _hub_time(iso: str) -> str:
    """The registry's ISO time in the Hub's format, which huggingface_hub parses strictly."""
    return datetime.fromisoformat(iso).astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _sibling_lfs(entry: dict) -> dict | None:
    if not entry["lfs"]:
        return None
    return {"size": entry["size"], "sha256": entry["sha256"], "pointerSize": LFS_POINTER_SIZE}


def _card_data(readme: Path) -> dict | None:
    if not readme.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(readme).data.to_dict()
    except Exception:  # a hand-written card without valid metadata still serves its files
        return None


def serve(registry: Registry, base: BaseModel, access: HubAccess, host: str, port: int, inline_max_bytes: int = INLINE_MAX_BYTES) -> None:
    import uvicorn

    uvicorn.run(create_app(registry, base, access, inline_max_bytes), host=host, port=port, log_level="info")
