"""`loraflow arena`, `loraflow votes export` and `loraflow loop`, added through the register_commands hook."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import click
import typer

from hub.errors import LoraflowError
from hub.hookspecs import hookimpl

VOTES_HELP = "Vote database: a SQLite file or any SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db (default: ./votes.db)."


def _registry(ctx: click.Context):
    from hub.registry import Registry

    return Registry(ctx.find_root().obj.get("registry"))


def _auth(value: Optional[str]):
    """USER:PASSWORD, or a file holding one USER:PASSWORD per line."""
    if not value:
        return None
    lines = Path(value).read_text().splitlines() if Path(value).is_file() else [value]
    pairs = [tuple(line.split(":", 1)) for line in lines if line.strip()]
    if not pairs or any(len(pair) != 2 for pair in pairs):
        raise LoraflowError(f"--auth takes USER:PASSWORD or a file of USER:PASSWORD lines; got {value!r}.")
    return pairs


def arena(
    ctx: typer.Context,
    names: List[str] = typer.Argument(..., help="Adapter names whose versions compete (with the base)."),
    server: str = typer.Option(os.environ.get("LORAFLOW_SERVER", "http://127.0.0.1:8000"), "--server", help="The `loraflow serve` address, http://HOST:PORT."),
    votes: Optional[str] = typer.Option(None, "--votes", envvar="LORAFLOW_VOTES", help=VOTES_HELP),
    base: str = typer.Option("smollm2-135m", "--base", help="The base model the server runs (it competes as 'base')."),
    no_base: bool = typer.Option(False, "--no-base", help="Leave the base model out of the contestants."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address the UI listens on."),
    port: int = typer.Option(7860, "--port", help="Port the UI listens on."),
    auth: Optional[str] = typer.Option(None, "--auth", envvar="LORAFLOW_ARENA_AUTH", help="Require login: USER:PASSWORD or a file of such lines."),
    max_tokens: int = typer.Option(96, "--max-tokens", help="Longest answer in tokens."),
    rate_limit: int = typer.Option(30, "--rate-limit", help="Votes one session may cast per minute."),
    api_key: str = typer.Option(os.environ.get("LORAFLOW_API_KEY", "EMPTY"), "--api-key", help="The server's API key, if it needs one."),
):
    """Open the Gradio arena: two anonymous answers, four vote buttons, a leaderboard with lineage."""
    from serve.arena import build_arena
    from serve.launcher import served_name
    from serve.rounds import Arena, ArenaSettings
    from serve.votes import RateLimit, VoteStore

    from hub.base import resolve_base

    registry = _registry(ctx)
    for name in names:
        registry.versions(name)  # fails early, naming the registry, when NAME is unknown
    settings = ArenaSettings(
        names=list(names), server_url=server, api_key=api_key, include_base=not no_base, max_tokens=max_tokens, base_model=served_name(resolve_base(base))
    )
    store = VoteStore(votes, rate_limit=RateLimit(votes=rate_limit, window_s=60))
    blocks = build_arena(Arena(settings, registry, store))
    typer.echo(f"arena for {', '.join(names)} on http://{host}:{port} (server {server}, votes {store.url.split('@')[-1]})", err=True)
    blocks.queue(default_concurrency_limit=8).launch(server_name=host, server_port=port, auth=_auth(auth), show_error=True)


def votes_export(
    name: str = typer.Argument(..., help="Adapter name: votes where any of its versions answered."),
    out: Path = typer.Option(..., "--out", help="The JSONL file to write (prompt/chosen/rejected)."),
    votes: Optional[str] = typer.Option(None, "--votes", envvar="LORAFLOW_VOTES", help=VOTES_HELP),
    after: int = typer.Option(0, "--after", help="Only votes with a sequence number above this."),
):
    """Write A/B votes as TRL preference pairs; ties are counted and left out, both-bad votes go to a side file."""
    from serve.export import export_preferences
    from serve.votes import VoteStore

    report = export_preferences(VoteStore(votes, rate_limit=None).votes(name=name, after_seq=after), out)
    typer.echo(f"{report.pairs} pairs → {report.out}")
    typer.echo(f"{report.ties} ties left out")
    side = f" → {report.both_bad_out}" if report.both_bad_out else ""
    typer.echo(f"{report.both_bad} both-bad votes kept aside{side}")
    typer.echo(json.dumps({"pairs": report.pairs, "ties": report.ties, "both_bad": report.both_bad, "first_seq": report.first_seq, "last_seq": report.last_seq}))


def loop(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The adapter to improve from its arena votes."),
    votes: Optional[str] = typer.Option(None, "--votes", envvar="LORAFLOW_VOTES", help=VOTES_HELP),
    votes_needed: int = typer.Option(100, "--votes-needed", help="New decisive votes on the live version that start a retrain."),
    min_win_rate: Optional[float] = typer.Option(None, "--min-win-rate", help="Promote only if the new version wins this share of head-to-head votes against its parent."),
    gate_votes: int = typer.Option(20, "--gate-votes", help="Decisive head-to-head votes the win-rate gate waits for."),
    base: str = typer.Option("smollm2-135m", "--base", help="The base model the adapter was trained on."),
    set_values: List[str] = typer.Option([], "--set", help="Trainer setting KEY=VALUE, e.g. --set max_steps=30 (repeatable)."),
    poll_s: float = typer.Option(5.0, "--poll", help="Seconds between looks at the vote store."),
    once: bool = typer.Option(False, "--once", help="Take one step and exit (for cron jobs and tests)."),
):
    """Watch the votes; after enough of them, DPO-train the next version from the live one and swap it in."""
    import yaml

    from serve.loop import FeedbackLoop, LoopSettings
    from serve.votes import VoteStore

    overrides = {}
    for item in set_values:
        key, separator, value = item.partition("=")
        if not separator:
            raise LoraflowError(f"--set takes KEY=VALUE, got {item!r}.")
        overrides[key.replace("-", "_")] = yaml.safe_load(value)
    settings = LoopSettings(
        name=name, votes_needed=votes_needed, min_win_rate=min_win_rate, gate_votes=gate_votes, base=base, training_overrides=overrides, poll_s=poll_s
    )
    feedback = FeedbackLoop(settings, _registry(ctx), VoteStore(votes, rate_limit=None))

    def report(event):
        timings = " ".join(f"{stage}={seconds:.1f}s" for stage, seconds in event.timings_s.items())
        typer.echo(f"[{event.action}] {event.detail} {timings}".rstrip(), err=True)

    feedback.run(max_steps=1 if once else None, on_event=report)


@hookimpl
def register_commands(cli: click.Group) -> None:
    app = typer.Typer()
    app.command("arena")(arena)
    app.command("loop")(loop)
    votes_app = typer.Typer(name="votes", help="Arena votes: export them as preference data.", no_args_is_help=True)
    # A callback keeps `votes` a group (Typer collapses a one-command app into that command).
    votes_app.callback()(lambda: None)
    votes_app.command("export")(votes_export)
    commands = typer.main.get_command(app)
    for name in ("arena", "loop"):
        cli.add_command(commands.get_command(None, name), name)
    cli.add_command(typer.main.get_command(votes_app), "votes")
