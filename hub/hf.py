"""The Hugging Face side of an adapter: its model card, pushing versions to a Hub, pulling adapters from one.

Any endpoint huggingface_hub can talk to works: huggingface.co, a mirror, or `loraflow hub serve`.
huggingface_hub reads the endpoint (HF_ENDPOINT) and the token (HF_TOKEN or `hf auth login`) itself,
so loraflow never sees, prints or logs the token.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loraflow.hub.adapters import PICKLE_SUFFIXES, adapter_files, copy_adapter_files, verify_hashes
from loraflow.hub.base import BaseModel
from loraflow.hub.errors import LoraflowError
from loraflow.hub.hub_protocol import (
    HEALTH_ROUTE,
    LIVE_BRANCH,
    NAMESPACE,
    build_adapter_card,
    card_metadata,
    version_branch,
    version_of_branch,
)
from loraflow.hub.hub_protocol import write_adapter_card as write_adapter_card  # trainers import it from here

if TYPE_CHECKING:
    from huggingface_hub import ModelCard


def card_for_version(registry, version, repo_id: str | None = None) -> ModelCard:
    """The card for a registry version as it is now: current metrics and the full lineage."""
    folder = registry.folder(version)
    stored = card_metadata(folder)
    try:
        lineage = [ancestor.ref for ancestor in registry.lineage(version.ref)]
    except LoraflowError:  # an ancestor was removed; keep what the record says
        lineage = [ref for ref in (version.parent, version.ref) if ref]
    return build_adapter_card(
        folder,
        name=version.name,
        base=version.base,
        trainer=version.trainer or {"name": "lora"},
        config=stored.get("hyperparameters") or {},
        metrics=version.metrics,
        parent=version.parent,
        data_summary=stored.get("data") or {},
        version=version.version,
        lineage=lineage,
        repo_id=repo_id,
    )


@contextmanager
def hub_errors(what: str, endpoint: str) -> Iterator[None]:
    """Turn huggingface_hub and network errors into messages that say what to do (never the token)."""
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        import httpx2 as http_client  # huggingface_hub 2.x
    except ImportError:
        import httpx as http_client
    try:
        yield
    except RevisionNotFoundError as error:
        raise LoraflowError(f"{what}: no such revision at {endpoint} ({_server_message(error)}).") from None
    except RepositoryNotFoundError as error:
        raise LoraflowError(
            f"{what}: not found at {endpoint}, or private and the token was missing or refused "
            f"({_server_message(error)}). Check the name, and set HF_TOKEN or run `hf auth login`."
        ) from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "?"
        hint = " Set HF_TOKEN to a token with write access, or run `hf auth login`." if status in (401, 403) else ""
        raise LoraflowError(
            f"{what}: the Hub at {endpoint} answered HTTP {status}: {_server_message(error)}.{hint}"
        ) from None
    except http_client.TransportError as error:
        raise LoraflowError(
            f"{what}: cannot reach {endpoint} ({type(error).__name__}). Check HF_ENDPOINT and the network."
        ) from None


def _server_message(error) -> str:
    return (getattr(error, "server_message", None) or str(error).splitlines()[0]).strip().rstrip(".")


@dataclass(frozen=True)
class PushResult:
    repo_url: str
    revisions: dict[str, str]


def push_to_hub(
    registry, ref: str, repo_id: str, *, private: bool | None = None, endpoint: str | None = None
) -> PushResult:
    """Push NAME, NAME@V or NAME@ALIAS with a fresh model card.

    On huggingface.co (or any other Hub), version V goes to branch vV; pushing NAME or an alias also moves main.
    A `loraflow hub serve` endpoint numbers versions itself and keeps its own lifecycle: NAME (the live version)
    is a commit to main, which the server publishes and promotes; NAME@V becomes a candidate on the server's
    next vN; NAME@ALIAS becomes a candidate on the alias branch, which then points at it.
    """
    from huggingface_hub import HfApi

    from loraflow.hub.registry import AdapterRef

    adapter_ref = AdapterRef.parse(ref)
    version = registry.get(adapter_ref)
    if version.kind == "prompt":
        raise LoraflowError(
            f"{version.ref} is a prompt (a system prompt on the base), not an adapter; the Hub takes adapter folders. "
            f"Its text is in {registry.folder(version)}, and `loraflow registry show {version.ref}` prints it."
        )
    folder = registry.folder(version)
    verify_hashes(folder, version.files)
    api = HfApi(endpoint=endpoint)
    loraflow_hub = is_loraflow_hub(api.endpoint)
    with hub_errors(repo_id, api.endpoint), tempfile.TemporaryDirectory(prefix="loraflow-push-") as staging:
        copy_adapter_files(folder, Path(staging), adapter_files(folder))  # the publish rules hold for uploads too
        card_for_version(registry, version, repo_id).save(Path(staging) / "README.md")
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        if loraflow_hub:
            revisions = _push_to_loraflow_hub(api, repo_id, Path(staging), adapter_ref, version)
        else:
            revisions = _push_in_hub_layout(api, repo_id, Path(staging), adapter_ref, version)
    return PushResult(repo_url=str(repo_url), revisions=revisions)


def _push_in_hub_layout(api, repo_id: str, staging: Path, adapter_ref, version) -> dict[str, str]:
    """Branch vN holds version N; main follows what was pushed by name or alias, as a Hub reader expects."""
    revisions = {}
    targets = [version_branch(version.version)] + ([] if adapter_ref.selector.isdigit() else [LIVE_BRANCH])
    for target in targets:
        if target != LIVE_BRANCH:
            api.create_branch(repo_id, branch=target, exist_ok=True)
        message = f"{version.ref} ({adapter_ref.selector})" if target == LIVE_BRANCH else version.ref
        revisions[target] = _mirror_folder(api, repo_id, staging, target, message)
    return revisions


def _push_to_loraflow_hub(api, repo_id: str, staging: Path, adapter_ref, version) -> dict[str, str]:
    """One commit: NAME to main (published and promoted), NAME@ALIAS to its branch, anything else to the next vN."""
    from huggingface_hub import constants

    from loraflow.hub.registry import LIVE

    constants.HF_HUB_DISABLE_XET = True  # what HF_HUB_DISABLE_XET=1 sets: the server speaks LFS, not Xet
    selector = adapter_ref.selector
    alias = None if selector.isdigit() or selector in ("latest", LIVE) else selector
    branches = _branches(api, repo_id)
    if selector == LIVE:
        target = LIVE_BRANCH
    elif alias in branches:
        target = alias
    else:  # a new alias starts as a candidate on the next vN, then the alias branch is made there
        numbers = [version_of_branch(branch) or 0 for branch in branches]
        target = version_branch(max(numbers, default=0) + 1)
    commit = _mirror_folder(api, repo_id, staging, target, f"{version.ref} ({selector})")
    if alias and alias not in branches:
        api.create_branch(repo_id, branch=alias, revision=commit)
    number = (getattr(api.model_info(repo_id, revision=commit), "loraflow", None) or {}).get("version")
    return {target: commit, version_branch(number): commit, **({alias: commit} if alias else {})}


def _branches(api, repo_id: str) -> set[str]:
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        return {ref.name for ref in api.list_repo_refs(repo_id).branches}
    except RepositoryNotFoundError:  # a loraflow hub makes the repo with its first commit
        return set()


def is_loraflow_hub(endpoint: str) -> bool:
    """Whether the endpoint is `loraflow hub serve` (it answers a health check huggingface.co does not have)."""
    from huggingface_hub.utils import get_session

    try:
        response = get_session().get(f"{endpoint.rstrip('/')}{HEALTH_ROUTE}", timeout=10)
        return response.status_code == 200 and response.json().get("namespace") == NAMESPACE
    except Exception:  # any failure means "not a loraflow hub"; the push itself reports real errors
        return False


def _mirror_folder(api, repo_id: str, folder: Path, revision: str, message: str, repo_type: str = "model") -> str:
    """One commit that makes `revision` hold exactly the folder's files (the Hub's .gitattributes stays)."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    local = {path.relative_to(folder).as_posix(): path for path in sorted(folder.rglob("*")) if path.is_file()}
    try:
        remote = set(api.list_repo_files(repo_id, revision=revision, repo_type=repo_type))
    except (RevisionNotFoundError, RepositoryNotFoundError):  # a loraflow hub makes repos and vN by committing
        remote = set()
    stale = sorted(remote - set(local) - {".gitattributes"})
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in local.items()]
    operations += [CommitOperationDelete(path_in_repo=path) for path in stale]
    message = f"loraflow push {message}"
    commit = api.create_commit(
        repo_id, operations=operations, commit_message=message, revision=revision, repo_type=repo_type
    )
    return commit.oid


def push_dataset_folder(
    folder: Path, repo_id: str, message: str, *, private: bool | None = None, endpoint: str | None = None
) -> PushResult:
    """Make dataset repo ORG/REPO's main hold exactly the folder's files, in one commit; the repo is made if missing.

    The same calls on huggingface.co and on a `loraflow hub serve` endpoint, which speaks LFS, not Xet."""
    from huggingface_hub import HfApi, constants

    parsed, revision = parse_hub_source(repo_id)
    if "@" in repo_id:
        raise LoraflowError(f"{repo_id!r}: a dataset is pushed to its main branch; give ORG/REPO without @{revision}.")
    api = HfApi(endpoint=endpoint)
    if is_loraflow_hub(api.endpoint):
        constants.HF_HUB_DISABLE_XET = True  # what HF_HUB_DISABLE_XET=1 sets
    with hub_errors(f"dataset {parsed}", api.endpoint):
        repo_url = api.create_repo(parsed, repo_type="dataset", private=private, exist_ok=True)
        commit = _mirror_folder(api, parsed, Path(folder), LIVE_BRANCH, message, repo_type="dataset")
    return PushResult(repo_url=str(repo_url), revisions={LIVE_BRANCH: commit})


def parse_hub_source(source: str) -> tuple[str, str]:
    repo_id, _, revision = source.partition("@")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise LoraflowError(f"{source!r}: give a Hub repo as ORG/REPO or ORG/REPO@REVISION (a branch, tag or commit).")
    return repo_id, revision or "main"


def pull_from_hub(registry, source: str, name: str, *, base: BaseModel, endpoint: str | None = None):
    """Download ORG/REPO[@REV] and publish it as the next version of NAME, with every local publish check."""
    from huggingface_hub import HfApi, snapshot_download

    from loraflow.hub.registry import check_name

    check_name(name)
    repo_id, revision = parse_hub_source(source)
    api = HfApi(endpoint=endpoint)
    with hub_errors(f"{repo_id}@{revision}", api.endpoint):
        info = api.model_info(repo_id, revision=revision)
        pickles = [s.rfilename for s in info.siblings or [] if Path(s.rfilename).suffix.lower() in PICKLE_SUFFIXES]
        if pickles:
            raise LoraflowError(
                f"{repo_id}@{revision}: {pickles[0]} holds pickle weights, which can run arbitrary code when loaded; "
                "refused. Ask the author for a safetensors adapter (adapter_model.safetensors)."
            )
        with tempfile.TemporaryDirectory(prefix="loraflow-pull-") as cache:
            snapshot = Path(
                snapshot_download(
                    repo_id,
                    revision=info.sha,
                    cache_dir=cache,
                    endpoint=api.endpoint,
                    ignore_patterns=[".gitattributes"],
                )
            )
            folder = _dereference_snapshot(snapshot, Path(cache) / name)
            card = card_metadata(folder)
            return registry.publish(
                folder,
                name,
                base=base,
                trainer=card.get("trainer") or {"name": "hub"},
                metrics=card.get("metrics") or {},
                provenance={
                    "source": "huggingface-hub",
                    "endpoint": api.endpoint,
                    "repo": repo_id,
                    "revision": revision,
                    "commit": info.sha,
                    "card_lineage": card.get("lineage", []),
                },
            )


def _dereference_snapshot(snapshot: Path, target: Path) -> Path:
    """huggingface_hub's snapshot is links into its blob cache; publish takes regular files, so copy them out."""
    target.mkdir()
    for path in snapshot.iterdir():
        if path.is_dir():
            raise LoraflowError(f"{path.name}/: the Hub repo holds a folder; an adapter repo holds files only.")
        shutil.copyfile(path, target / path.name)
    return target


def pull_to_cache(
    endpoint: str, name: str, revision: str = LIVE_BRANCH, cache_dir: str | os.PathLike | None = None
) -> Path:
    """Fetch registry adapter NAME at a revision (main, vN, an alias) from a `loraflow hub serve` endpoint.

    Returns the local folder. Downloads once per version (huggingface_hub's cache) and checks every file
    against the sha256 the registry recorded at publish time. For serving replicas and resolvers.
    """
    from huggingface_hub import HfApi, snapshot_download

    from loraflow.hub.base import cache_dir as loraflow_cache

    repo_id = f"{NAMESPACE}/{name}"
    api = HfApi(endpoint=endpoint)
    with hub_errors(f"{repo_id}@{revision}", api.endpoint):
        info = api.model_info(repo_id, revision=revision)
        folder = Path(
            snapshot_download(
                repo_id, revision=info.sha, endpoint=api.endpoint, cache_dir=cache_dir or loraflow_cache() / "hub"
            )
        )
    recorded = getattr(info, "loraflow", None) or {}
    if not recorded.get("files"):
        raise LoraflowError(
            f"{endpoint}: {repo_id} carries no loraflow file hashes; is this a `loraflow hub serve` endpoint?"
        )
    verify_hashes(folder, recorded["files"])
    return folder
