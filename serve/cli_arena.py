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


def _arena(ctx, names, server, votes, base, no_base, api_key, max_tokens, rate_limit):
    """The Arena the UI and the simulated voter share: contestants from the registry, votes in the store."""
    from hub.base import resolve_base
    from serve.launcher import served_name
    from serve.rounds import Arena, ArenaSettings
    from serve.votes import VoteStore

    registry = _registry(ctx)
    for name in names:
        registry.versions(name)  # fails early, naming the registry, when NAME is unknown
    settings = ArenaSettings(
        names=list(names), server_url=server, api_key=api_key, include_base=not no_base, max_tokens=max_tokens, base_model=served_name(resolve_base(base))
    )
    return Arena(settings, registry, VoteStore(votes, rate_limit=rate_limit))


SERVER_OPTION = typer.Option(os.environ.get("LORAFLOW_SERVER", "http://127.0.0.1:8000"), "--server", help="The `loraflow serve` address, http://HOST:PORT.")
API_KEY_OPTION = typer.Option(os.environ.get("LORAFLOW_API_KEY", "EMPTY"), "--api-key", help="The server's API key, if it needs one.")


def arena(
    ctx: typer.Context,
    names: List[str] = typer.Argument(..., help="Adapter names whose versions compete (with the base)."),
    server: str = SERVER_OPTION,
    votes: Optional[str] = typer.Option(None, "--votes", envvar="LORAFLOW_VOTES", help=VOTES_HELP),
    base: str = typer.Option("smollm2-135m", "--base", help="The base model the server runs (it competes as 'base')."),
    no_base: bool = typer.Option(False, "--no-base", help="Leave the base model out of the contestants."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address the UI listens on."),
    port: int = typer.Option(7860, "--port", help="Port the UI listens on."),
    auth: Optional[str] = typer.Option(None, "--auth", envvar="LORAFLOW_ARENA_AUTH", help="Require login: USER:PASSWORD or a file of such lines."),
    max_tokens: int = typer.Option(96, "--max-tokens", help="Longest answer in tokens."),
    rate_limit: int = typer.Option(30, "--rate-limit", help="Votes one session may cast per minute."),
    api_key: str = API_KEY_OPTION,
):
    """Open the Gradio arena: two anonymous answers, four vote buttons, a leaderboard with lineage."""
    from serve.arena import build_arena
    from serve.votes import RateLimit

    built = _arena(ctx, names, server, votes, base, no_base, api_key, max_tokens, RateLimit(votes=rate_limit, window_s=60))
    blocks = build_arena(built)
    typer.echo(f"arena for {', '.join(names)} on http://{host}:{port} (server {server}, votes {built.store.url.split('@')[-1]})", err=True)
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


def votes_simulate(
    ctx: typer.Context,
    names: List[str] = typer.Argument(..., help="Adapter names whose versions compete (with the base)."),
    rounds: int = typer.Option(100, "--rounds", help="Rounds to play."),
    prompts: Path = typer.Option(Path("data/pirate/train.jsonl"), "--prompts", help="JSONL file whose user prompts are asked."),
    server: str = SERVER_OPTION,
    votes: Optional[str] = typer.Option(None, "--votes", envvar="LORAFLOW_VOTES", help=VOTES_HELP),
    base: str = typer.Option("smollm2-135m", "--base", help="The base model the server runs."),
    no_base: bool = typer.Option(False, "--no-base", help="Leave the base model out of the contestants."),
    seed: int = typer.Option(0, "--seed", help="Seed for prompts and pairings."),
    api_key: str = API_KEY_OPTION,
):
    """Vote with the rule-based pirate judge (an answer opening with "Arr" wins) through the arena's own vote path."""
    from rich.progress import track

    from serve.judge import prompts_from, simulate_votes

    built = _arena(ctx, names, server, votes, base, no_base, api_key, 32, None)
    outcomes: dict[str, int] = {}
    batch = 10
    for start in track(range(0, rounds, batch), description=f"simulated votes ({rounds} rounds)"):
        report = simulate_votes(built, prompts_from(prompts), min(batch, rounds - start), seed=seed + start, session_id=f"simulated-{seed}-{start}")
        for outcome, count in report.outcomes.items():
            outcomes[outcome] = outcomes.get(outcome, 0) + count
    typer.echo(json.dumps({"rounds": rounds, "outcomes": outcomes}))


def votes_leaderboard(
    ctx: typer.Context,
    names: List[str] = typer.Argument(..., help="Adapter names whose lineage to show."),
    votes: Optional[str] = typer.Option(None, "--votes", envvar="LORAFLOW_VOTES", help=VOTES_HELP),
):
    """Print Elo and Bradley-Terry ratings (95% bootstrap intervals), vote counts and lineage."""
    from rich.console import Console
    from rich.table import Table

    from serve.ratings import leaderboard
    from serve.votes import VoteStore

    table = Table("contestant", "Elo", "Bradley-Terry (95% CI)", "votes", "W/L/D")
    for rating in leaderboard(VoteStore(votes, rate_limit=None).votes(), 200):
        table.add_row(
            rating.contestant, f"{rating.elo:.0f}", f"{rating.bt:.0f} ({rating.bt_low:.0f}-{rating.bt_high:.0f})",
            str(rating.votes), f"{rating.wins}/{rating.losses}/{rating.draws}",
        )
    console = Console()
    console.print(table)
    registry = _registry(ctx)
    for name in names:
        console.print("lineage: " + " -> ".join(v.ref for v in registry.lineage(f"{name}@latest")))


def judge(
    model_a: str = typer.Argument(..., help="A model name the server knows: NAME@V, NAME, or the base."),
    model_b: str = typer.Argument(..., help="The model to compare with it."),
    prompts: Path = typer.Option(Path("data/pirate/heldout.jsonl"), "--prompts", help="JSONL file of held-out prompts."),
    server: str = SERVER_OPTION,
    api_key: str = API_KEY_OPTION,
):
    """Compare two served models on held-out prompts under the rule-based pirate judge (greedy answers)."""
    from openai import OpenAI

    from serve.judge import compare, prompts_from

    client = OpenAI(base_url=server.rstrip("/") + "/v1", api_key=api_key)
    result = compare(client, model_a, model_b, prompts_from(prompts))
    typer.echo(f"{result.prompts} held-out prompts, answers opening with Arr: {model_a} {result.pirate_a}, {model_b} {result.pirate_b}")
    typer.echo(f"head to head: {model_b} won {result.wins_b} of {result.wins_a + result.wins_b} decisive ({result.win_rate_b:.0%})")


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
    app.command("judge")(judge)
    votes_app = typer.Typer(name="votes", help="Arena votes: simulate, rank and export them as preference data.", no_args_is_help=True)
    votes_app.command("export")(votes_export)
    votes_app.command("simulate")(votes_simulate)
    votes_app.command("leaderboard")(votes_leaderboard)
    commands = typer.main.get_command(app)
    for name in ("arena", "loop", "judge"):
        cli.add_command(commands.get_command(None, name), name)
    cli.add_command(typer.main.get_command(votes_app), "votes")
