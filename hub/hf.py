"""The Hugging Face side of an adapter: its model card, pushing versions to a Hub, pulling adapters from one.

Any endpoint huggingface_hub can talk to works: huggingface.co, a mirror, or `loraflow hub serve`.
huggingface_hub reads the endpoint (HF_ENDPOINT) and the token (HF_TOKEN or `hf auth login`) itself,
so loraflow never sees, prints or logs the token.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from huggingface_hub import ModelCard, ModelCardData

from hub.adapters import PICKLE_SUFFIXES, verify_hashes
from hub.base import BaseModel
from hub.errors import LoraflowError

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ name }}{% if version %} (v{{ version }}){% endif %}

A LoRA adapter for [{{ base_id }}](https://huggingface.co/{{ base_id }}), trained with the loraflow
`{{ trainer.name }}` trainer{% if trainer.package %} ({{ trainer.package }} {{ trainer.version }}){% endif %}.

## Lineage
{% if lineage %}{% for ref in lineage %}{{ ref }}{% if not loop.last %} → {% endif %}{% endfor %}
{% elif parent %}Continues from `{{ parent }}`.
{% else %}Trained from the base model.
{% endif %}
## Data
{% for key, value in data_summary.items() %}- {{ key }}: {{ value }}
{% endfor %}
## Hyperparameters
{% for key, value in config.items() %}- {{ key }}: {{ value }}
{% endfor %}
## Metrics
{% for key, value in metrics.items() %}- {{ key }}: {{ value }}
{% endfor %}
{% if loss_curve %}## Loss curve

![loss curve]({{ loss_curve }})
{% endif %}
## Use

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{{ base_id }}"), "{{ location }}"{% if revision %}, revision="{{ revision }}"{% endif %})
```
"""


def build_adapter_card(
    adapter_dir: Path,
    *,
    name: str,
    base: BaseModel | dict,
    trainer: dict,
    config: dict,
    metrics: dict,
    parent: str | None,
    data_summary: dict,
    version: int | None = None,
    lineage: list[str] | None = None,
    repo_id: str | None = None,
) -> ModelCard:
    """The card's metadata carries base_model, library_name and tags for the Hub, and a `loraflow` block
    (trainer, hyperparameters, metrics, lineage) that `loraflow pull` and the hub server read back."""
    base_id = base.hub_id if isinstance(base, BaseModel) else base["hub_id"]
    metrics = {key: round(value, 4) if isinstance(value, float) else value for key, value in metrics.items()}
    method = trainer.get("name", "lora")
    card_data = ModelCardData(
        base_model=base_id,
        library_name="peft",
        pipeline_tag="text-generation",
        tags=list(dict.fromkeys(["loraflow", "lora", method])),
        model_name=name,
        loraflow={
            "name": name,
            "version": version,
            "trainer": trainer,
            "parent": parent,
            "lineage": lineage or ([parent] if parent else []),
            "hyperparameters": config,
            "data": data_summary,
            "metrics": metrics,
        },
    )
    loss_curve = "loss_curve.png" if (Path(adapter_dir) / "loss_curve.png").is_file() else None
    return ModelCard.from_template(
        card_data,
        template_str=CARD_TEMPLATE,
        name=name,
        version=version,
        base_id=base_id,
        trainer=trainer,
        parent=parent,
        lineage=lineage,
        data_summary=data_summary,
        config=config,
        metrics=metrics,
        loss_curve=loss_curve,
        location=repo_id or f"path/to/{name}",
        revision=f"v{version}" if repo_id and version else None,
    )


def write_adapter_card(adapter_dir: Path, **details) -> Path:
    """Write README.md (the model card) into the adapter folder."""
    path = Path(adapter_dir) / "README.md"
    build_adapter_card(adapter_dir, **details).save(path)
    return path


def card_metadata(folder: Path) -> dict:
    """The `loraflow` block of the folder's model card, or {} when there is none."""
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return {}
    try:
        block = ModelCard.load(readme).data.to_dict().get("loraflow")
    except Exception:  # a card without valid metadata is still a valid adapter
        return {}
    return block if isinstance(block, dict) else {}


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
        raise LoraflowError(f"{what}: the Hub at {endpoint} answered HTTP {status}: {_server_message(error)}.{hint}") from None
    except http_client.TransportError as error:
        raise LoraflowError(f"{what}: cannot reach {endpoint} ({type(error).__name__}). Check HF_ENDPOINT and the network.") from None


def _server_message(error) -> str:
    return (getattr(error, "server_message", None) or str(error).splitlines()[0]).strip().rstrip(".")


@dataclass(frozen=True)
class PushResult:
    repo_url: str
    revisions: dict[str, str]


def push_to_hub(registry, ref: str, repo_id: str, *, private: bool | None = None, endpoint: str | None = None) -> PushResult:
    """Push NAME@V with a fresh model card.

    On a Hub, version V goes to branch vV; pushing an alias (or plain NAME, i.e. latest) also moves main to it.
    A `loraflow hub serve` endpoint numbers versions itself, so there the push is one commit to main,
    which becomes that server's next version.
    """
    from huggingface_hub import HfApi

    from hub.registry import AdapterRef

    adapter_ref = AdapterRef.parse(ref)
    version = registry.get(adapter_ref)
    folder = registry.folder(version)
    verify_hashes(folder, version.files)
    api = HfApi(endpoint=endpoint)
    loraflow_hub = is_loraflow_hub(api.endpoint)
    with hub_errors(repo_id, api.endpoint), tempfile.TemporaryDirectory(prefix="loraflow-push-") as staging:
        shutil.copytree(folder, staging, dirs_exist_ok=True)
        card_for_version(registry, version, repo_id).save(Path(staging) / "README.md")
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        if loraflow_hub:
            revisions = _push_to_loraflow_hub(api, repo_id, Path(staging), adapter_ref, version)
        else:
            revisions = {}
            for target in [f"v{version.version}"] + ([] if adapter_ref.selector.isdigit() else ["main"]):
                if target != "main":
                    api.create_branch(repo_id, branch=target, exist_ok=True)
                message = f"{version.ref} ({adapter_ref.selector})" if target == "main" else version.ref
                revisions[target] = _mirror_folder(api, repo_id, Path(staging), target, message)
    return PushResult(repo_url=str(repo_url), revisions=revisions)


def _push_to_loraflow_hub(api, repo_id: str, staging: Path, adapter_ref, version) -> dict[str, str]:
    """One commit: to the pushed alias when the server has it (moving it), else to main; then name the alias."""
    from huggingface_hub import constants

    constants.HF_HUB_DISABLE_XET = True  # what HF_HUB_DISABLE_XET=1 sets: the server speaks LFS, not Xet
    alias = None if adapter_ref.selector.isdigit() or adapter_ref.selector == "latest" else adapter_ref.selector
    branches = {ref.name for ref in api.list_repo_refs(repo_id).branches} if api.repo_exists(repo_id) else set()
    target = alias if alias in branches else "main"
    commit = _mirror_folder(api, repo_id, staging, target, f"{version.ref} ({adapter_ref.selector})")
    if alias and alias not in branches:
        api.create_branch(repo_id, branch=alias, revision=commit)
    number = getattr(api.model_info(repo_id, revision=commit), "loraflow", {}).get("version")
    return {f"v{number}": commit, target: commit, **({alias: commit} if alias else {})}


def is_loraflow_hub(endpoint: str) -> bool:
    """Whether the endpoint is `loraflow hub serve` (it answers a health check huggingface.co does not have)."""
    from huggingface_hub.utils import get_session

    try:
        response = get_session().get(f"{endpoint.rstrip('/')}/api/loraflow/health", timeout=10)
        return response.status_code == 200 and response.json().get("namespace") == "loraflow"
    except Exception:  # any failure means "not a loraflow hub"; the push itself reports real errors
        return False


def _mirror_folder(api, repo_id: str, folder: Path, revision: str, message: str) -> str:
    """One commit that makes `revision` hold exactly the folder's files (the Hub's .gitattributes stays)."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    local = {path.relative_to(folder).as_posix(): path for path in sorted(folder.rglob("*")) if path.is_file()}
    try:
        remote = set(api.list_repo_files(repo_id, revision=revision))
    except (RevisionNotFoundError, RepositoryNotFoundError):  # a loraflow hub creates repos and vN with their first commit
        remote = set()
    operations = [CommitOperationAdd(path_in_repo=relative, path_or_fileobj=str(path)) for relative, path in local.items()]
    operations += [CommitOperationDelete(path_in_repo=stale) for stale in sorted(remote - set(local) - {".gitattributes"})]
    return api.create_commit(repo_id, operations=operations, commit_message=f"loraflow push {message}", revision=revision).oid


def parse_hub_source(source: str) -> tuple[str, str]:
    repo_id, _, revision = source.partition("@")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise LoraflowError(f"{source!r}: give a Hub repo as ORG/REPO or ORG/REPO@REVISION (a branch, tag or commit).")
    return repo_id, revision or "main"


def pull_from_hub(registry, source: str, name: str, *, base: BaseModel, endpoint: str | None = None):
    """Download ORG/REPO[@REV] and publish it as the next version of NAME, with every local publish check."""
    from huggingface_hub import HfApi, snapshot_download

    from hub.registry import check_name

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
            folder = Path(
                snapshot_download(repo_id, revision=info.sha, cache_dir=cache, endpoint=api.endpoint, ignore_patterns=[".gitattributes"])
            )
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


def pull_to_cache(endpoint: str, name: str, revision: str = "main", cache_dir: str | os.PathLike | None = None) -> Path:
    """Fetch registry adapter NAME at a revision (main, vN, an alias) from a `loraflow hub serve` endpoint.

    Returns the local folder. Downloads once per version (huggingface_hub's cache) and checks every file
    against the sha256 the registry recorded at publish time. For serving replicas and resolvers.
    """
    from huggingface_hub import HfApi, snapshot_download

    from hub.base import cache_dir as loraflow_cache
    from hub.hub_server import NAMESPACE

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
        raise LoraflowError(f"{endpoint}: {repo_id} carries no loraflow file hashes; is this a `loraflow hub serve` endpoint?")
    verify_hashes(folder, recorded["files"])
    return folder
