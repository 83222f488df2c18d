"""The Hub routes of dataset repos (`repo_type="dataset"`): what huggingface_hub's dataset calls and
`datasets.load_dataset` use. Reads sit behind require_read, writes behind require_write; the store is
app.state.datasets (a DatasetStore). Creating a dataset repo is the shared /api/repos/create route in app.py.
"""

from __future__ import annotations

import hashlib
from typing import Annotated
from urllib.parse import parse_qs

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

from loraflow.hub.hub_protocol import LIVE_BRANCH
from loraflow.hub.hub_server.access import require_read, require_write
from loraflow.hub.hub_server.datasets import DatasetCommit, DatasetStore, check_dataset_name
from loraflow.hub.hub_server.repos import HubError, parse_commit, safe_relative
from loraflow.hub.hub_server.web import (
    LfsBatchBody,
    PreuploadBody,
    blob_fields,
    card_data,
    flag,
    hub_time,
    json_body,
    lfs_batch_answer,
    tree,
)

MAX_PATHS_INFO = 1_000

reads = APIRouter(dependencies=[Depends(require_read)])
writes = APIRouter(dependencies=[Depends(require_write)])


def dataset_store(request: Request) -> DatasetStore:
    return request.app.state.datasets


Datasets = Annotated[DatasetStore, Depends(dataset_store)]


def checked_dataset(org: str, name: str) -> str:
    return check_dataset_name(org, name)


DatasetRepo = Annotated[str, Depends(checked_dataset)]


def dataset_url(request: Request, repo: str) -> str:
    return f"{str(request.base_url).rstrip('/')}/datasets/{repo}"


@reads.get("/api/datasets/{org}/{name}")
def dataset_info_main(request: Request, datasets: Datasets, repo: DatasetRepo):
    return _dataset_info(request, datasets, repo, LIVE_BRANCH)


@reads.get("/api/datasets/{org}/{name}/revision/{revision}")
def dataset_info_revision(request: Request, datasets: Datasets, repo: DatasetRepo, revision: str):
    return _dataset_info(request, datasets, repo, revision)


def _dataset_info(request: Request, datasets: Datasets, repo: str, revision: str) -> dict:
    from huggingface_hub import DatasetCard

    commit = datasets.resolve(repo, revision)
    with_blobs = flag(request, "blobs")
    readme = datasets.file_path(repo, commit, "README.md") if "README.md" in commit.files else None
    return {
        "_id": commit.id,
        "id": repo,
        "author": repo.split("/")[0],
        "sha": commit.id,
        "lastModified": hub_time(commit.created),
        "createdAt": hub_time(datasets.commits(repo)[0].created),
        "private": request.app.state.access.private,
        "gated": False,
        "disabled": False,
        "tags": ["loraflow"],
        "cardData": card_data(readme, DatasetCard),
        "siblings": [
            {"rfilename": entry["path"], **(blob_fields(entry) if with_blobs else {})}
            for entry in datasets.files(commit)
        ],
    }


@reads.get("/api/datasets/{org}/{name}/tree/{revision}")
def tree_root(request: Request, datasets: Datasets, repo: DatasetRepo, revision: str):
    return _tree(datasets, repo, revision, "", flag(request, "recursive"))


@reads.get("/api/datasets/{org}/{name}/tree/{revision}/{folder:path}")
def tree_folder(request: Request, datasets: Datasets, repo: DatasetRepo, revision: str, folder: str):
    return _tree(datasets, repo, revision, folder, flag(request, "recursive"))


def _tree(datasets: DatasetStore, repo: str, revision: str, folder: str, recursive: bool) -> list[dict]:
    commit = datasets.resolve(repo, revision)
    return tree(datasets.files(commit), folder, recursive, f"datasets/{repo}@{revision}")


@reads.post("/api/datasets/{org}/{name}/paths-info/{revision}")
async def paths_info(request: Request, datasets: Datasets, repo: DatasetRepo, revision: str):
    """The entries (files and folders) for the asked paths; paths that do not exist are left out, as on the Hub."""
    try:
        form = parse_qs((await request.body()).decode(), strict_parsing=False, max_num_fields=MAX_PATHS_INFO + 1)
    except (UnicodeDecodeError, ValueError) as error:
        raise HubError(400, f"paths-info takes a form body with one or more 'paths' fields ({error}).") from None
    paths = [safe_relative(path.strip("/")) for path in form.get("paths", [])]
    if not paths:
        raise HubError(400, "paths-info needs at least one 'paths' field in its form body.")
    commit = datasets.resolve(repo, revision)
    return _paths_info(datasets.files(commit), paths)


def _paths_info(entries: list[dict], paths: list[str]) -> list[dict]:
    by_path = {entry["path"]: entry for entry in entries}
    answers = []
    for path in dict.fromkeys(paths):
        entry = by_path.get(path)
        if entry is not None:
            item = {"type": "file", "path": path, "size": entry["size"], "oid": entry["oid"]}
            answers.append({**item, "lfs": entry["lfs"]} if entry["lfs"] else item)
        elif any(known.startswith(f"{path}/") for known in by_path):
            answers.append({"type": "directory", "path": path, "oid": hashlib.sha1(path.encode()).hexdigest()})
    return answers


@reads.get("/api/datasets/{org}/{name}/refs")
def refs(datasets: Datasets, repo: DatasetRepo):
    head = datasets.commits(repo)[-1]
    main = {"name": LIVE_BRANCH, "ref": f"refs/heads/{LIVE_BRANCH}", "targetCommit": head.id}
    return {"branches": [main], "tags": [], "converts": []}


@reads.get("/api/datasets/{org}/{name}/commits/{revision}")
def commits(datasets: Datasets, repo: DatasetRepo, revision: str):
    """The history up to a revision, newest first (what list_repo_commits reads)."""
    history = datasets.commits(repo)
    tip = datasets.resolve(repo, revision)
    kept = history[: [commit.id for commit in history].index(tip.id) + 1]
    return [_commit_entry(commit) for commit in reversed(kept)]


def _commit_entry(commit: DatasetCommit) -> dict:
    return {
        "id": commit.id,
        "title": commit.summary,
        "message": "",
        "authors": [{"user": "loraflow"}],
        "date": hub_time(commit.created),
    }


@reads.api_route("/datasets/{org}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
def resolve_file(datasets: Datasets, repo: DatasetRepo, revision: str, path: str):
    commit = datasets.resolve(repo, revision)
    served = datasets.file_path(repo, commit, path)
    digest = commit.files[safe_relative(path)]["sha256"]
    headers = {"ETag": f'"{digest}"', "X-Repo-Commit": commit.id, "Cache-Control": "no-cache"}
    return FileResponse(served, headers=headers, media_type="application/octet-stream")


@writes.post("/api/datasets/{org}/{name}/preupload/{revision}")
def preupload(
    datasets: Datasets, repo: DatasetRepo, revision: str, payload: Annotated[PreuploadBody, json_body(PreuploadBody)]
):
    """Which files go through LFS, and the oids main already has (the client skips unchanged files)."""
    head = datasets.resolve(repo, revision)
    answers = []
    for item in payload.files:
        path = safe_relative(item.path)
        mode = "lfs" if item.size > datasets.inline_max_bytes else "regular"
        remote = head.files.get(path)
        oid = None
        if remote:
            oid = remote["sha256"] if mode == "lfs" else remote["blob_id"]
        answers.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
    return {"files": answers, "commitOid": None}


@writes.post("/datasets/{org}/{repo_git}/info/lfs/objects/batch")
def lfs_batch(
    request: Request,
    datasets: Datasets,
    org: str,
    repo_git: str,
    payload: Annotated[LfsBatchBody, json_body(LfsBatchBody)],
):
    repo = check_dataset_name(org, repo_git.removesuffix(".git"))
    repos = request.app.state.repos  # the model repos hold the upload signing key the LFS upload route checks
    return lfs_batch_answer(request, payload, lambda oid: datasets.blob_path(repo, oid) is not None, repos.sign_upload)


@writes.post("/api/datasets/{org}/{name}/commit/{revision}")
async def commit(request: Request, datasets: Datasets, repo: DatasetRepo, revision: str):
    """Every commit to main is a new immutable revision; main moves to it."""
    if flag(request, "create_pr"):
        raise HubError(400, "a loraflow hub has no pull requests; commit to main.")
    parsed = parse_commit(await request.body())
    created = await run_in_threadpool(datasets.apply_commit, repo, revision, parsed)
    return {
        "commitUrl": f"{dataset_url(request, repo)}/commit/{created.id}",
        "commitOid": created.id,
        "pullRequestUrl": None,
    }
