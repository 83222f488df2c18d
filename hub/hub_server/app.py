"""The FastAPI app: the Hub HTTP routes huggingface_hub calls for model repos, over HubRepos, and the uvicorn runner.

Three routers here: `public` (health, whoami, validate-yaml, signed LFS uploads, the Xet refusal for both repo
kinds), `reads` (behind require_read) and `writes` (behind require_write); dataset_routes.py adds reads and writes
for dataset repos, and /api/repos/create makes both kinds. The app's state holds the HubRepos, the DatasetStore
and the HubAccess.
Request limits: headers over 16 KiB get 431; bodies over `max_body_bytes` (`hub serve --max-body-mb`, 64 MiB by
default, room for a commit of inline base64 files) get 413. LFS uploads are not JSON and not under that limit:
each takes exactly the size the LFS batch endpoint signed for it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response

from loraflow.hub.base import BaseModel
from loraflow.hub.errors import LoraflowError
from loraflow.hub.hub_protocol import (
    HEALTH_ROUTE,
    LIVE_BRANCH,
    NAMESPACE,
    REGISTRY_ROUTE,
    card_metadata,
    repo_id,
    version_branch,
    version_of_branch,
)
from loraflow.hub.hub_server import dataset_routes
from loraflow.hub.hub_server.access import HubAccess, bearer_token, require_read, require_write
from loraflow.hub.hub_server.dataset_routes import dataset_url
from loraflow.hub.hub_server.datasets import DATASETS_DIR, DatasetStore, check_dataset_name
from loraflow.hub.hub_server.repos import (
    INLINE_MAX_BYTES,
    HubError,
    HubRepos,
    commit_id,
    git_blob_id,
    parse_commit,
    safe_relative,
)
from loraflow.hub.hub_server.web import (
    LFS_UPLOAD_PREFIX,
    LfsBatchBody,
    PreuploadBody,
    RequestBody,
    blob_fields,
    card_data,
    error_response,
    flag,
    hub_time,
    json_body,
    lfs_batch_answer,
    tree,
)
from loraflow.hub.registry import AdapterVersion, Registry

MAX_HEADER_BYTES = 16 * 1024
MAX_BODY_BYTES = 64 * 1024 * 1024


class RequestLimits:
    """ASGI middleware: 431 for oversized headers and 413 for oversized bodies, declared or streamed."""

    def __init__(self, app, max_body_bytes: int, max_header_bytes: int = MAX_HEADER_BYTES):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        header_bytes = sum(len(name) + len(value) for name, value in scope["headers"])
        if header_bytes > self.max_header_bytes:
            refusal = HubError(
                431, f"the request headers are {header_bytes} bytes; this hub takes at most {self.max_header_bytes}."
            )
            return await error_response(refusal)(scope, receive, send)
        if scope["path"].startswith(LFS_UPLOAD_PREFIX):  # limited by the size its URL was signed for
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return await error_response(self._too_large(int(declared)))(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                raise self._too_large(received)
            return message

        await self.app(scope, limited_receive, send)

    def _too_large(self, size: int) -> HubError:
        return HubError(
            413,
            f"the request body is over {self.max_body_bytes} bytes (got {size}); upload big files through Git LFS "
            "(files above the inline limit do), or start the hub with a larger --max-body-mb.",
        )


def hub_repos(request: Request) -> HubRepos:
    return request.app.state.repos


Repos = Annotated[HubRepos, Depends(hub_repos)]


def checked_repo_name(namespace: str, name: str, repos: Repos) -> str:
    return repos.repo_name(namespace, name)


RepoName = Annotated[str, Depends(checked_repo_name)]


class CreateRepoBody(RequestBody):
    name: str
    organization: str | None = None
    type: str | None = None


class BranchBody(RequestBody):
    startingPoint: str | None = None


class TagBody(RequestBody):
    tag: str
    message: str | None = None


class ValidateYamlBody(RequestBody):
    content: str = ""


public = APIRouter()
reads = APIRouter(dependencies=[Depends(require_read)])
writes = APIRouter(dependencies=[Depends(require_write)])


def _repo_url(request: Request, name: str) -> str:
    return f"{str(request.base_url).rstrip('/')}/{repo_id(name)}"


@public.get(HEALTH_ROUTE)
def health(repos: Repos):
    return {"status": "ok", "registry_revision": repos.registry.revision, "namespace": NAMESPACE}


@public.get("/api/whoami-v2")
def whoami(request: Request):
    role = request.app.state.access.role(bearer_token(request))
    if role in (None, "invalid"):
        raise HubError(401, "Invalid credentials in Authorization header")
    return {"type": "user", "name": f"loraflow-{role}", "auth": {"accessToken": {"role": role}}, "orgs": []}


@public.post("/api/validate-yaml")
def validate_yaml(payload: Annotated[ValidateYamlBody, json_body(ValidateYamlBody)]):
    from huggingface_hub import RepoCard

    try:
        RepoCard(payload.content)
    except Exception as error:  # RepoCard raises ValueError or a YAML error for bad metadata
        return JSONResponse({"errors": [{"message": str(error)}], "warnings": []}, status_code=400)
    return {"errors": [], "warnings": []}


@public.put(LFS_UPLOAD_PREFIX + "{oid}")
async def lfs_upload(request: Request, repos: Repos, oid: str, size: int, expires: int, signature: str):
    repos.check_upload_signature(oid, size, expires, signature)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) != size:
        raise HubError(413 if int(declared) > size else 400, f"this upload URL takes {size} bytes, not {declared}.")
    objects = repos.uploads / "objects"
    objects.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=".part-", dir=objects)
    digest, received = hashlib.sha256(), 0
    try:
        with os.fdopen(descriptor, "wb") as stream:
            async for chunk in request.stream():
                digest.update(chunk)
                received += len(chunk)
                if received > size:
                    raise HubError(413, f"this upload URL takes {size} bytes; the body is longer.")
                stream.write(chunk)
        if digest.hexdigest() != oid or received != size:
            raise HubError(
                400,
                f"uploaded object does not match: expected sha256 {oid} and {size} bytes, "
                f"got {digest.hexdigest()} and {received}.",
            )
        os.replace(temporary, objects / oid)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return {"oid": oid, "size": size}


@public.api_route("/api/models/{namespace}/{name}/xet-{kind}-token/{revision}", methods=["GET", "POST"])
@public.api_route("/api/datasets/{org}/{name}/xet-{kind}-token/{revision}", methods=["GET", "POST"])
def xet_token(repos: Repos):
    """One refusal for model and dataset repos: both share the inline limit and the LFS upload route."""
    raise HubError(
        501,
        "this loraflow hub does not speak the Xet protocol: set HF_HUB_DISABLE_XET=1 in the uploading client "
        f"(files over {repos.inline_max_bytes} bytes go through the LFS API).",
    )


@reads.get(REGISTRY_ROUTE)
def registry_metadata(request: Request, repos: Repos):
    """The registry's metadata (names, versions, states, aliases, sha256s, bases), for serving replicas to mirror.

    Its ETag is the registry revision, so a replica polling with If-None-Match gets a bodiless 304 until a
    publish. The adapter files themselves are fetched through the Hub routes and checked against the sha256s.
    """
    snapshot = repos.snapshot()
    etag = f'"{snapshot.revision}"'
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"ETag": etag})
    return JSONResponse(snapshot.to_dict(), headers={"ETag": etag, "Cache-Control": "no-cache"})


@reads.get("/api/models/{namespace}/{name}")
def model_info_live(request: Request, repos: Repos, repo: RepoName):
    return _model_info(request, repos, repo, LIVE_BRANCH)


@reads.get("/api/models/{namespace}/{name}/revision/{revision}")
def model_info_revision(request: Request, repos: Repos, repo: RepoName, revision: str):
    return _model_info(request, repos, repo, revision)


def _model_info(request: Request, repos: Repos, name: str, revision: str) -> dict:
    from huggingface_hub import ModelCard

    version = repos.resolve(name, revision)
    folder = repos.registry.folder(version)
    with_blobs = flag(request, "blobs")
    siblings = [
        {"rfilename": entry["path"], **(blob_fields(entry) if with_blobs else {})} for entry in repos.files(version)
    ]
    return {
        "_id": commit_id(version),
        "id": repo_id(name),
        "modelId": repo_id(name),
        "author": NAMESPACE,
        "sha": commit_id(version),
        "lastModified": hub_time(version.created),
        "createdAt": hub_time(repos.versions(name)[0].created),
        "private": request.app.state.access.private,
        "gated": False,
        "disabled": False,
        "library_name": "peft",
        "pipeline_tag": "text-generation",
        "tags": ["peft", "lora", "loraflow", version.trainer.get("name", "upload")],
        "cardData": card_data(folder / "README.md", ModelCard),
        "siblings": siblings,
        "loraflow": {
            "version": version.version,
            "state": version.state,
            "aliases": repos.snapshot().aliases(name),
            "files": version.files,
            "base": version.base,
            "metrics": version.metrics,
            "lineage": card_metadata(folder).get("lineage", []),
        },
    }


@reads.get("/api/models/{namespace}/{name}/tree/{revision}")
def tree_root(request: Request, repos: Repos, repo: RepoName, revision: str):
    return _tree(repos, repo, revision, "", recursive=flag(request, "recursive"))


@reads.get("/api/models/{namespace}/{name}/tree/{revision}/{folder:path}")
def tree_folder(request: Request, repos: Repos, repo: RepoName, revision: str, folder: str):
    return _tree(repos, repo, revision, folder, recursive=flag(request, "recursive"))


def _tree(repos: HubRepos, name: str, revision: str, folder: str, recursive: bool) -> list[dict]:
    return tree(repos.files(repos.resolve(name, revision)), folder, recursive, f"{repo_id(name)}@{revision}")


@reads.get("/api/models/{namespace}/{name}/refs")
def refs(repos: Repos, repo: RepoName):
    """main is the live version, vN each version, and every user alias a branch."""
    versions = {version.version: version for version in repos.versions(repo)}
    snapshot = repos.snapshot()

    def branch(branch_name: str, version: AdapterVersion) -> dict:
        return {"name": branch_name, "ref": f"refs/heads/{branch_name}", "targetCommit": commit_id(version)}

    live = snapshot.live(repo)
    branches = [branch(LIVE_BRANCH, live)] if live else []
    branches += [branch(version_branch(number), version) for number, version in sorted(versions.items())]
    branches += [branch(alias, versions[number]) for alias, number in sorted(snapshot.aliases(repo).items())]
    return {"branches": branches, "tags": [], "converts": []}


@reads.api_route("/{namespace}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
def resolve_file(repos: Repos, repo: RepoName, revision: str, path: str):
    version = repos.resolve(repo, revision)
    relative = safe_relative(path)
    digest = version.files.get(relative)
    if digest is None:
        raise HubError(404, f"{repo_id(repo)}@{revision} has no file {relative!r}.", "EntryNotFound")
    served = repos.registry.folder(version) / relative
    if served.is_symlink() or not served.is_file():  # the store holds regular files only; never follow a link out
        raise HubError(
            404, f"{repo_id(repo)}@{revision}: {relative!r} is not a regular file in the store.", "EntryNotFound"
        )
    headers = {"ETag": f'"{digest}"', "X-Repo-Commit": commit_id(version), "Cache-Control": "no-cache"}
    return FileResponse(served, headers=headers, media_type="application/octet-stream")


@writes.post("/api/repos/create")
def create_repo(request: Request, repos: Repos, payload: Annotated[CreateRepoBody, json_body(CreateRepoBody)]):
    if payload.type == "dataset":
        return _create_dataset(request, payload)
    if payload.type not in ("model", None):
        raise HubError(400, f"a loraflow hub holds model and dataset repos, not {payload.type!r} repos.")
    name = repos.repo_name(payload.organization or NAMESPACE, payload.name)
    url = _repo_url(request, name)
    if repos.exists(name):
        return JSONResponse({"error": "You already created this model repo", "url": url}, status_code=409)
    return {"url": url, "name": repo_id(name)}


def _create_dataset(request: Request, payload: CreateRepoBody):
    if not payload.organization:
        raise HubError(400, "a dataset repo on a loraflow hub is ORG/REPO: give the organization too.")
    repo = check_dataset_name(payload.organization, payload.name)
    url = dataset_url(request, repo)
    if not request.app.state.datasets.create(repo):
        return JSONResponse({"error": "You already created this dataset repo", "url": url}, status_code=409)
    return {"url": url, "name": repo}


@writes.post("/api/models/{namespace}/{name}/preupload/{revision}")
def preupload(repos: Repos, repo: RepoName, revision: str, payload: Annotated[PreuploadBody, json_body(PreuploadBody)]):
    """Which files go through LFS, and the oids the revision already has (the client skips unchanged files)."""
    current, folder = {}, None
    if repos.exists(repo) and version_of_branch(revision) != repos.next_version(repo):
        version = repos.resolve(repo, revision)
        current, folder = {entry["path"]: entry for entry in repos.files(version)}, repos.registry.folder(version)
    answers = []
    for item in payload.files:
        path = safe_relative(item.path)
        mode = "lfs" if item.size > repos.inline_max_bytes else "regular"
        remote = current.get(path)
        oid = None
        if remote:
            oid = remote["sha256"] if mode == "lfs" else git_blob_id(folder / path)
        answers.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
    return {"files": answers, "commitOid": None}


@writes.post("/{namespace}/{repo_git}/info/lfs/objects/batch")
def lfs_batch(
    request: Request,
    repos: Repos,
    namespace: str,
    repo_git: str,
    payload: Annotated[LfsBatchBody, json_body(LfsBatchBody)],
):
    repos.repo_name(namespace, repo_git.removesuffix(".git"))
    return lfs_batch_answer(request, payload, lambda oid: repos.blob_path(oid) is not None, repos.sign_upload)


@writes.post("/api/models/{namespace}/{name}/commit/{revision}")
async def commit(request: Request, repos: Repos, repo: RepoName, revision: str):
    """main: publish and promote; the next vN: a candidate; an alias: a candidate the alias then names."""
    if flag(request, "create_pr"):
        raise HubError(400, "a loraflow hub has no pull requests; commit to main, to an alias or to the next vN.")
    parsed = parse_commit(await request.body())
    version = await run_in_threadpool(repos.apply_commit, repo, revision, parsed)
    oid = commit_id(version)
    return {
        "commitUrl": f"{_repo_url(request, repo)}/commit/{oid}",
        "commitOid": oid,
        "pullRequestUrl": None,
        "loraflowVersion": version.version,
    }


@writes.post("/api/models/{namespace}/{name}/branch/{branch}")
def create_branch(repos: Repos, repo: RepoName, branch: str, payload: Annotated[BranchBody, json_body(BranchBody)]):
    number = version_of_branch(branch)
    if number is None:
        return _make_alias(repos, repo, branch, payload.startingPoint or LIVE_BRANCH)
    upcoming = repos.next_version(repo)
    if number == upcoming:
        return {}  # the next vN comes into being with its first commit
    if number < upcoming:
        raise HubError(409, f"{repo_id(repo)}: branch {branch} already exists.")
    raise HubError(
        409, f"{repo_id(repo)}: the next version is v{upcoming}, not {branch}; this hub numbers versions itself."
    )


@writes.post("/api/models/{namespace}/{name}/tag/{revision}")
def create_tag(repos: Repos, repo: RepoName, revision: str, payload: Annotated[TagBody, json_body(TagBody)]):
    number = version_of_branch(payload.tag)
    if number is None:
        return _make_alias(repos, repo, payload.tag, revision)
    version = repos.resolve(repo, revision)
    if version.version == number:
        raise HubError(409, f"{repo_id(repo)}: {payload.tag} already names this version.")
    raise HubError(409, f"{repo_id(repo)}: {revision} is v{version.version}, so it cannot be tagged {payload.tag}.")


def _make_alias(repos: HubRepos, name: str, alias: str, revision: str) -> dict:
    repos.versions(name)
    if alias == LIVE_BRANCH or alias in repos.snapshot().aliases(name):
        raise HubError(409, f"{repo_id(name)}: {alias} already exists.")
    version = repos.resolve(name, revision)
    repos.registry.set_alias(version.ref, alias)  # it refuses reserved and malformed aliases with a LoraflowError
    return {}


async def _hub_error(request: Request, error: HubError):
    return error_response(error)


async def _loraflow_error(request: Request, error: LoraflowError):
    return error_response(HubError(400, str(error)))


async def _invalid_request(request: Request, error: RequestValidationError):
    problems = "; ".join(f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}" for item in error.errors()[:3])
    return error_response(HubError(400, f"{request.url.path}: bad request: {problems}."))


async def _unexpected_error(request: Request, error: Exception):
    # The traceback goes to the server log (Starlette re-raises after this); the client gets no internals.
    return error_response(HubError(500, f"internal error in the loraflow hub ({type(error).__name__}); see its log."))


def create_app(
    registry: Registry,
    base: BaseModel,
    access: HubAccess,
    inline_max_bytes: int = INLINE_MAX_BYTES,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    """The FastAPI app. One process may serve many readers and writers; the registry's file lock orders writes."""
    app = FastAPI(title="loraflow hub", summary="The loraflow adapter registry over the Hugging Face Hub API.")
    app.state.repos = HubRepos(registry, base, inline_max_bytes)
    app.state.datasets = DatasetStore(registry.root / DATASETS_DIR, app.state.repos.uploads, inline_max_bytes)
    app.state.access = access
    app.add_middleware(RequestLimits, max_body_bytes=max_body_bytes)
    app.add_exception_handler(HubError, _hub_error)
    app.add_exception_handler(LoraflowError, _loraflow_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(Exception, _unexpected_error)
    # The dataset routes first: /datasets/ORG/REPO/... must never be read as a model repo named ORG in `datasets/`.
    for router in (public, dataset_routes.reads, dataset_routes.writes, reads, writes):
        app.include_router(router)
    return app


def serve(
    registry: Registry,
    base: BaseModel,
    access: HubAccess,
    host: str,
    port: int,
    inline_max_bytes: int = INLINE_MAX_BYTES,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> None:
    import uvicorn

    app = create_app(registry, base, access, inline_max_bytes, max_body_bytes)
    uvicorn.run(app, host=host, port=port, log_level="info")
