"""`loraflow push`, `loraflow pull` and `loraflow hub serve`: the registry and Hugging Face Hub endpoints."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from loraflow.hub.base import DEFAULT_BASE
from loraflow.hub.cli_common import registry_from

console = Console()
errors = Console(stderr=True)

hub_app = typer.Typer(
    help="Serve the registry over the Hugging Face Hub HTTP API, so other machines share it.", no_args_is_help=True
)


def push(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="NAME (the live version), NAME@V or NAME@ALIAS."),
    to_hub: str = typer.Option(
        ..., "--to-hub", help="The Hub repo, ORG/REPO. The endpoint is HF_ENDPOINT (default huggingface.co)."
    ),
    private: bool | None = typer.Option(None, "--private/--public", help="Visibility if the repo is created now."),
):
    """Upload a registry version with its model card to a Hugging Face Hub repo.

    On huggingface.co it goes to branch vN, and pushing NAME or NAME@ALIAS also moves main.
    To a `loraflow hub serve` endpoint it becomes that server's next version: NAME commits to main (published
    and made live there), NAME@V to the next vN (a candidate), NAME@ALIAS to the alias branch (a candidate the
    alias then names). The token comes from HF_TOKEN or `hf auth login`; it is never printed.
    """
    from loraflow.hub.hf import push_to_hub

    result = push_to_hub(registry_from(ctx), ref, to_hub, private=private)
    for revision, commit in result.revisions.items():
        console.print(f"[green]pushed[/] {ref} → {to_hub}@{revision} (commit {commit[:12]})")
    console.print(f"  {result.repo_url}")


def pull(
    ctx: typer.Context,
    source: str = typer.Argument(..., help="ORG/REPO or ORG/REPO@REVISION (branch, tag or commit)."),
    name: str = typer.Option(..., "--name", help="Registry name; the adapter becomes NAME@N."),
    base: str = typer.Option(DEFAULT_BASE, "--base", help="The base model the adapter must fit."),
):
    """Download an adapter from a Hugging Face Hub repo and publish it into the registry.

    It gets the checks of a local publish: safetensors only, fits the base, sha256 of every file.
    """
    from loraflow.hub.base import resolve_base
    from loraflow.hub.hf import pull_from_hub

    version = pull_from_hub(registry_from(ctx), source, name, base=resolve_base(base))
    console.print(f"[green]pulled[/] {source} → {version.ref}")


@hub_app.command("serve")
def serve(
    ctx: typer.Context,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; 0.0.0.0 for other machines."),
    port: int = typer.Option(8800, "--port", help="TCP port."),
    base: str = typer.Option(DEFAULT_BASE, "--base", help="The base model uploads must fit."),
    tokens: Path | None = typer.Option(
        None,
        "--tokens",
        help="File of tokens, one per line: 'TOKEN' (write) or 'TOKEN read'. LORAFLOW_HUB_TOKEN adds a write token.",
    ),
    private: bool = typer.Option(False, "--private", help="Reads need a token too (by default anyone may read)."),
    inline_limit_mb: float = typer.Option(
        5.0, "--inline-limit-mb", help="Bigger files upload through Git LFS; those clients need HF_HUB_DISABLE_XET=1."
    ),
    max_body_mb: float = typer.Option(
        64.0,
        "--max-body-mb",
        help="Largest JSON or commit body (inline files travel base64 in it) before 413. LFS uploads are not "
        "limited by it: each takes the size its signed URL names.",
    ),
):
    """Serve the registry as Hub repos loraflow/NAME for huggingface_hub clients.

    Revision main is NAME's live version, vN is version N, each alias a branch. A commit to main publishes and
    promotes; a commit to the next vN or to an alias publishes a candidate. Clients set HF_ENDPOINT=http://HOST:PORT,
    then snapshot_download, PeftModel.from_pretrained("loraflow/NAME") and HfApi.upload_folder work unchanged.
    Dataset repos ORG/REPO (repo_type="dataset") live in datasets/ beside the registry: each commit is a new
    revision, main the newest, and datasets.load_dataset("ORG/REPO") reads them.
    Writes need a token (HF_TOKEN on the client). Headers over 16 KiB get 431, bodies over --max-body-mb 413.
    """
    from loraflow.hub.base import resolve_base
    from loraflow.hub.hub_protocol import NAMESPACE
    from loraflow.hub.hub_server import HubAccess
    from loraflow.hub.hub_server import serve as run_server

    if max_body_mb <= 0 or inline_limit_mb <= 0:
        raise typer.BadParameter("--max-body-mb and --inline-limit-mb must be positive numbers of MiB.")
    registry = registry_from(ctx)
    access = HubAccess.load(tokens, private)
    resolved = resolve_base(base)
    writes = f"{len(access.write_tokens)} write token(s)" if access.write_tokens else "read-only: no write token"
    errors.print(
        f"[bold]loraflow hub[/] serving {registry.path} as {NAMESPACE}/NAME for base {resolved.name}\n"
        f"  HF_ENDPOINT=http://{host}:{port}   reads: {'token' if private else 'public'}   writes: {writes}"
    )
    run_server(
        registry,
        resolved,
        access,
        host,
        port,
        inline_max_bytes=int(inline_limit_mb * 1024 * 1024),
        max_body_bytes=int(max_body_mb * 1024 * 1024),
    )


def add_hub_commands(app: typer.Typer) -> None:
    """Mount push, pull and the hub group on the loraflow app."""
    app.command("push")(push)
    app.command("pull")(pull)
    app.add_typer(hub_app, name="hub")
