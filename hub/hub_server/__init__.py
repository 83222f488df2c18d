"""`loraflow hub serve`: the registry over the part of the Hugging Face Hub HTTP API that huggingface_hub uses.

Each registry name NAME is the model repo `loraflow/NAME`. Its revisions follow the registry's lifecycle:
- `main` is the live version (what NAME means), `vN` is version N, and each user alias (`production`) is a branch;
- every version has a stable 40-hex commit id derived from its name, number and file hashes.

Every upload ends in one Registry.publish, so it gets the checks of a local publish (actor "hub upload"):
- a commit to `main` takes the live version's files plus the commit's changes, and publishes and promotes the
  result in one atomic write: `main` then points at it;
- a commit to `vN`, where N is the next number, publishes the commit's files alone as a candidate;
- a commit to an alias branch takes that alias's files plus the changes, publishes a candidate and moves the alias.

It also holds dataset repos (`repo_type="dataset"`), ORG/REPO with both parts lowercase registry-style names, in
`datasets/ORG/REPO/` beside the registry's `adapters/` (see datasets.py). Every commit to a dataset's `main` is a
new immutable revision with its own commit id and `main` moves to it; older commit ids stay readable. Enough of the
Hub API is served for huggingface_hub (create_repo, upload_folder/create_commit, dataset_info, list_repo_files,
list_repo_tree, get_paths_info, list_repo_commits, hf_hub_download, snapshot_download) and for
`datasets.load_dataset("ORG/REPO")` with HF_ENDPOINT pointing here. `loraflow votes push` publishes arena votes
as such a dataset. A dataset repo must be created before its first commit, as on huggingface.co; it has no other
branches, tags or pull requests.

Reads of both kinds are public unless `--private`; writes need a write token.
Limits: request headers over 16 KiB get 431; JSON and NDJSON bodies over `--max-body-mb` (64 MiB by default)
get 413. Files up to `inline_max_bytes` upload inline in the commit; bigger ones go through the Git LFS batch API
with the `basic` transfer, each upload limited to the size the batch endpoint signed, so clients uploading those
set HF_HUB_DISABLE_XET=1 (this server does not speak Xet). A malformed request gets a 4xx that names what was wrong.
"""

from loraflow.hub.hub_protocol import NAMESPACE
from loraflow.hub.hub_server.access import HubAccess
from loraflow.hub.hub_server.app import create_app, serve

__all__ = ["NAMESPACE", "HubAccess", "create_app", "serve"]
