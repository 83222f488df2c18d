"""`loraflow hub serve`: the registry over the part of the Hugging Face Hub HTTP API that huggingface_hub uses.

Each registry name NAME is the model repo `loraflow/NAME`. Its revisions:
- `main` is the latest version, `vN` is version N, and each registry alias (`production`) is a branch;
- every version has a stable 40-hex commit id derived from its name, number and file hashes.

A commit to `main` or to an alias makes the next version from that revision's files plus the commit's
changes, and moves the alias. A commit to `vN`, where N is the next number, makes it from the commit's files
alone. Every upload ends in Registry.publish, so it gets the checks of a local publish.

Files up to `inline_max_bytes` upload inline in the commit; bigger ones go through the Git LFS batch API with
the `basic` transfer, so clients uploading those set HF_HUB_DISABLE_XET=1 (this server does not speak Xet).
"""

from hub.hub_server.access import HubAccess
from hub.hub_server.app import create_app, serve
from hub.hub_server.repos import NAMESPACE

__all__ = ["NAMESPACE", "HubAccess", "create_app", "serve"]
