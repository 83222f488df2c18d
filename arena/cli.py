"""`loraflow arena`, `loraflow votes ...`, `loraflow judge` and `loraflow loop`, added by the register_commands hook.

Option defaults and help texts come from the settings dataclasses, so each is written once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import click
import typer

from loraflow.arena.judge import DEFAULT_JUDGE
from loraflow.arena.settings import (
    DEFAULT_SERVER,
    DEFAULT_VOTERS,
    LOOP_TRAINING,
    VOTER_LABELS,
    ArenaSettings,
    GateSettings,
    HygieneSettings,
    LoopSettings,
    RateLimit,
    check_voters,
    trainer_config,
)
from loraflow.hub.base import DEFAULT_BASE
from loraflow.hub.cli_common import default_of, help_of, registry_from
from loraflow.hub.errors import LoraflowError
from loraflow.hub.hookspecs import hookimpl

VOTES_HELP = (
    "Vote database: a SQLite file or any SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db (default: ./votes.db)."
)


def setting_option(settings_class: type, name: str, flag: str) -> typer.models.OptionInfo:
    """A typer option whose default and help are the settings field's own."""
    return typer.Option(default_of(settings_class, name), flag, help=help_of(settings_class, name))


def _auth(value: Optional[str]):
    """USER:PASSWORD, or a file holding one USER:PASSWORD per line."""
    if not value:
        return None
    lines = Path(value).read_text().splitlines() if Path(value).is_file() else [value]
    pairs = [tuple(line.split(":", 1)) for line in lines if line.strip()]
    if not pairs or any(len(pair) != 2 for pair in pairs):
        raise LoraflowError(f"--auth takes USER:PASSWORD or a file of USER:PASSWORD lines; got {value!r}.")
    return pairs


def _arena(ctx, names, server, votes, base, no_base, api_key, max_tokens, rate_limit, on_policy_share):
    """The Arena the UI and the simulated voter share: contestants from the registry, votes in the store."""
    from loraflow.arena.rounds import Arena
    from loraflow.arena.votes import VoteStore
    from loraflow.hub.base import resolve_base

    registry = registry_from(ctx)
    for name in names:
        registry.versions(name)  # fails early, naming the registry, when NAME is unknown
    settings = ArenaSettings(
        names=list(names),
        server_url=server,
        api_key=api_key,
        include_base=not no_base,
        max_tokens=max_tokens,
        on_policy_share=on_policy_share,
        base_model=resolve_base(base).served_name,
    )
    return Arena(settings, registry, VoteStore(votes, rate_limit=rate_limit))


SERVER_OPTION = typer.Option(
    os.environ.get("LORAFLOW_SERVER", DEFAULT_SERVER),
    "--server",
    help="The `loraflow serve` address, http://HOST:PORT.",
)
API_KEY_OPTION = typer.Option(
    os.environ.get("LORAFLOW_API_KEY", default_of(ArenaSettings, "api_key")),
    "--api-key",
    help="The server's API key, if it needs one.",
)
VOTES_OPTION = typer.Option(None, "--votes", envvar="LORAFLOW_VOTES", help=VOTES_HELP)
NAMES_ARGUMENT = typer.Argument(..., help="Adapter names whose versions compete (with the base).")
BASE_OPTION = typer.Option(DEFAULT_BASE, "--base", help="The base model the server runs (it competes as 'base').")
HYGIENE_OPTION = typer.Option(
    True, "--hygiene/--no-hygiene", help="Leave out the votes vote hygiene excludes (caps, pace, outliers, leaks)."
)
ON_POLICY_OPTION = setting_option(ArenaSettings, "on_policy_share", "--on-policy-share")
MAX_TOKENS_OPTION = setting_option(ArenaSettings, "max_tokens", "--max-tokens")
NO_BASE_OPTION = typer.Option(
    not default_of(ArenaSettings, "include_base"), "--no-base", help="Leave the base model out of the contestants."
)


def arena(
    ctx: typer.Context,
    names: List[str] = NAMES_ARGUMENT,
    server: str = SERVER_OPTION,
    votes: Optional[str] = VOTES_OPTION,
    base: str = BASE_OPTION,
    no_base: bool = NO_BASE_OPTION,
    host: str = typer.Option("127.0.0.1", "--host", help="Address the UI listens on."),
    port: int = typer.Option(7860, "--port", help="Port the UI listens on."),
    auth: Optional[str] = typer.Option(
        None, "--auth", envvar="LORAFLOW_ARENA_AUTH", help="Require login: USER:PASSWORD or a file of such lines."
    ),
    max_tokens: int = MAX_TOKENS_OPTION,
    on_policy_share: float = ON_POLICY_OPTION,
    rate_limit: int = typer.Option(
        default_of(RateLimit, "votes"),
        "--rate-limit",
        help=f"Votes one session may cast per {default_of(RateLimit, 'window_s'):.0f} s.",
    ),
    api_key: str = API_KEY_OPTION,
):
    """Open the Gradio arena: two anonymous answers, four vote buttons, a leaderboard with lineage."""
    from loraflow.arena.ui import build_arena

    limit = RateLimit(votes=rate_limit)
    built = _arena(ctx, names, server, votes, base, no_base, api_key, max_tokens, limit, on_policy_share)
    blocks = build_arena(built)
    where = f"http://{host}:{port} (server {server}, votes {built.store.location})"
    typer.echo(f"arena for {', '.join(names)} on {where}", err=True)
    blocks.queue(default_concurrency_limit=8).launch(
        server_name=host, server_port=port, auth=_auth(auth), show_error=True
    )


VOTED_NAME_ARGUMENT = typer.Argument(..., help="Adapter name: votes where any of its versions answered.")
AFTER_OPTION = typer.Option(0, "--after", help="Only votes with a sequence number above this.")


def votes_export(
    name: str = VOTED_NAME_ARGUMENT,
    out: Path = typer.Option(..., "--out", help="The JSONL file to write."),
    votes: Optional[str] = VOTES_OPTION,
    after: int = AFTER_OPTION,
    data_format: str = typer.Option(
        "preference",
        "--format",
        help=(
            "preference: TRL prompt/chosen/rejected pairs from A/B votes, for dpo and ppo; ties are counted and left "
            "out, both-bad votes go to a side file. unpaired: TRL prompt/completion/label records, two per vote "
            "(A or B: the winner's answer true, the loser's false; tie: both true; both_bad: both false), for kto."
        ),
    ),
    lengths_balanced: bool = typer.Option(
        False,
        "--balance-lengths",
        help="Leave out votes so that as many winners are the longer answer as the shorter one (length de-biasing).",
    ),
):
    """Write the votes as training data: TRL preference pairs (the default) or unpaired, labelled answers."""
    from loraflow.arena.export import export_votes_of
    from loraflow.arena.votes import VoteStore

    store = VoteStore(votes, rate_limit=None, create=False)
    report = export_votes_of(store, name, out, after, data_format, lengths_balanced)
    summary = {
        "pairs": report.pairs,
        "ties": report.ties,
        "both_bad": report.both_bad,
        "first_seq": report.first_seq,
        "last_seq": report.last_seq,
    }
    if report.data_format == "unpaired":
        typer.echo(f"{report.desirable} desirable and {report.undesirable} undesirable answers → {report.out}")
        typer.echo(f"from {report.pairs} A/B votes, {report.ties} ties and {report.both_bad} both-bad votes")
        summary |= {"format": report.data_format, "desirable": report.desirable, "undesirable": report.undesirable}
    else:
        typer.echo(f"{report.pairs} pairs → {report.out}")
        typer.echo(f"{report.ties} ties left out")
        side = f" → {report.both_bad_out}" if report.both_bad_out else ""
        typer.echo(f"{report.both_bad} both-bad votes kept aside{side}")
    typer.echo(json.dumps(summary))


def votes_push(
    ctx: typer.Context,
    name: str = VOTED_NAME_ARGUMENT,
    to_hub: str = typer.Option(
        ..., "--to-hub", help="The dataset repo, ORG/REPO. The endpoint is HF_ENDPOINT (default huggingface.co)."
    ),
    votes: Optional[str] = VOTES_OPTION,
    after: int = AFTER_OPTION,
    private: Optional[bool] = typer.Option(None, "--private/--public", help="Visibility if the repo is created now."),
):
    """Publish the A/B votes as a preference dataset: Parquet (prompt/chosen/rejected) and a card with the vote
    window, counts and lineage. Session ids are published only as per-push HMACs. Token: HF_TOKEN or `hf auth login`."""
    from loraflow.arena.dataset_push import push_votes
    from loraflow.arena.votes import VoteStore

    store = VoteStore(votes, rate_limit=None, create=False)
    report = push_votes(store, registry_from(ctx), name, to_hub, after_seq=after, private=private)
    typer.echo(f"{report.pairs} pairs → {report.repo_id} (commit {report.commit[:12]})")
    typer.echo(f"{report.ties} ties left out, {report.both_bad} both-bad, {report.set_aside} set aside")
    typer.echo(f"  {report.repo_url}")
    summary = {
        "repo": report.repo_id,
        "commit": report.commit,
        "votes": report.votes,
        "pairs": report.pairs,
        "ties": report.ties,
        "both_bad": report.both_bad,
        "set_aside": report.set_aside,
        "first_seq": report.first_seq,
        "last_seq": report.last_seq,
    }
    typer.echo(json.dumps(summary))


JUDGE_OPTION = typer.Option(
    DEFAULT_JUDGE, "--judge", help="The judge that votes: pirate (rule-based), llm (asks --judge-model) or a plugin's."
)
JUDGE_MODEL_OPTION = typer.Option(
    None, "--judge-model", envvar="LORAFLOW_JUDGE_MODEL", help="The model the llm judge asks, by its served name."
)
JUDGE_SERVER_OPTION = typer.Option(
    None, "--judge-server", envvar="LORAFLOW_JUDGE_SERVER", help="Where the judge model is served (default: --server)."
)


def _judge(name: str, model: Optional[str], server: Optional[str], api_key: str):
    """The judge called NAME, built before any round is played, so a bad name or judge model fails at start."""
    from loraflow.arena.judge import JudgeSettings, load_judge

    return load_judge(name, JudgeSettings(server_url=server, api_key=api_key, model=model))


def votes_simulate(
    ctx: typer.Context,
    names: List[str] = NAMES_ARGUMENT,
    rounds: int = typer.Option(100, "--rounds", help="Rounds to play."),
    prompts: Path = typer.Option(
        Path("data/pirate/train.jsonl"), "--prompts", help="JSONL file whose user prompts are asked."
    ),
    server: str = SERVER_OPTION,
    votes: Optional[str] = VOTES_OPTION,
    base: str = BASE_OPTION,
    no_base: bool = NO_BASE_OPTION,
    seed: int = typer.Option(0, "--seed", help="Seed for prompts and pairings."),
    max_tokens: int = MAX_TOKENS_OPTION,
    on_policy_share: float = ON_POLICY_OPTION,
    api_key: str = API_KEY_OPTION,
    judge_name: str = JUDGE_OPTION,
    judge_model: Optional[str] = JUDGE_MODEL_OPTION,
    judge_server: Optional[str] = JUDGE_SERVER_OPTION,
):
    """Vote with a judge (default: the rule-based pirate judge) through the arena's own vote path. The votes' session
    ids read judge-NAME-..., so a judge's votes stay apart from people's."""
    from rich.progress import track

    from loraflow.arena.judge import judge_session, prompts_from, simulate_votes

    voter = _judge(judge_name, judge_model, judge_server or server, api_key)
    built = _arena(ctx, names, server, votes, base, no_base, api_key, max_tokens, None, on_policy_share)
    outcomes: dict[str, int] = {}
    batch = 10
    for start in track(range(0, rounds, batch), description=f"{voter.name} judge's votes ({rounds} rounds)"):
        session = judge_session(voter.name, seed, start)
        count = min(batch, rounds - start)
        report = simulate_votes(built, prompts_from(prompts), count, seed=seed + start, session_id=session, judge=voter)
        for outcome, count in report.outcomes.items():
            outcomes[outcome] = outcomes.get(outcome, 0) + count
    typer.echo(json.dumps({"judge": voter.name, "rounds": rounds, "outcomes": outcomes}))


VOTERS_OPTION = typer.Option(
    list(DEFAULT_VOTERS),
    "--voters",
    help="Whose votes a board counts: human (people's), ai (judges', sessions judge-...) or all; repeat it for "
    "several boards. By default people's and judges' votes get a board each, people's first, never mixed.",
)


def votes_leaderboard(
    ctx: typer.Context,
    names: List[str] = typer.Argument(..., help="Adapter names whose lineage to show."),
    votes: Optional[str] = VOTES_OPTION,
    base: str = BASE_OPTION,
    hygiene: bool = HYGIENE_OPTION,
    voters: List[str] = VOTERS_OPTION,
):
    """Print Bradley-Terry ratings, raw and style-controlled (95% intervals), online Elo, vote counts and lineage:
    a board of people's votes and one of judges' votes, or those --voters asks for."""
    voters = check_voters(voters)
    from rich.console import Console
    from rich.table import Table

    from loraflow.arena.ratings import LeaderboardFit
    from loraflow.arena.votes import VoteStore
    from loraflow.hub.base import resolve_base

    store = VoteStore(votes, rate_limit=None, create=False)
    registry = registry_from(ctx)
    for name in names:
        registry.versions(name)  # an unknown name fails before the ratings are computed
    screening = HygieneSettings() if hygiene else None
    base_names = [resolve_base(base).served_name]
    boards = LeaderboardFit(store.votes, hygiene=screening, base_names=base_names, voters=voters).refresh()
    console = Console()
    for group in voters:
        board = boards[group]
        plural = "" if board.votes == 1 else "s"
        console.print(f"{VOTER_LABELS[group]} board (--voters {group}): {board.votes} vote{plural}")
        if not board.votes:
            continue
        table = Table("contestant", "Bradley-Terry (95% CI)", "style-controlled (95% CI)", "Elo", "votes", "W/L/D")
        for rating in board.ratings:
            table.add_row(
                rating.contestant,
                f"{rating.bt:.0f} ({rating.bt_low:.0f}-{rating.bt_high:.0f})",
                f"{rating.style_bt:.0f} ({rating.style_low:.0f}-{rating.style_high:.0f})",
                f"{rating.elo:.0f}",
                str(rating.votes),
                f"{rating.wins}/{rating.losses}/{rating.draws}",
            )
        console.print(table)
        effects = ", ".join(f"{e.feature} {e.elo:+.0f} ({e.low:.0f} to {e.high:.0f})" for e in board.style)
        console.print(f"style effects, Elo per standard deviation (95% CI): {effects}")
        if board.excluded:
            left_out = ", ".join(f"{rule} {count}" for rule, count in board.excluded.items())
            console.print(f"left out by vote hygiene (still stored): {left_out}")
    for name in names:
        console.print("lineage: " + " -> ".join(v.ref for v in registry.lineage(f"{name}@latest")))


def judge(
    model_a: str = typer.Argument(..., help="A model name the server knows: NAME@V, NAME, or the base."),
    model_b: str = typer.Argument(..., help="The model to compare with it."),
    prompts: Path = typer.Option(
        Path("data/pirate/heldout.jsonl"), "--prompts", help="JSONL file of held-out prompts."
    ),
    server: str = SERVER_OPTION,
    api_key: str = API_KEY_OPTION,
    max_tokens: int = MAX_TOKENS_OPTION,
    judge_name: str = JUDGE_OPTION,
    judge_model: Optional[str] = JUDGE_MODEL_OPTION,
    judge_server: Optional[str] = JUDGE_SERVER_OPTION,
):
    """Compare two served models' greedy answers on held-out prompts under a judge (default: the pirate rule)."""
    from openai import OpenAI

    from loraflow.arena.judge import compare, prompts_from

    voter = _judge(judge_name, judge_model, judge_server or server, api_key)
    client = OpenAI(base_url=server.rstrip("/") + "/v1", api_key=api_key)
    result = compare(client, model_a, model_b, prompts_from(prompts), max_tokens=max_tokens, judge=voter)
    typer.echo(
        f"{result.prompts} held-out prompts, answers opening with Arr: "
        f"{model_a} {result.pirate_a}, {model_b} {result.pirate_b}"
    )
    typer.echo(f"words per answer: {model_a} {result.words_a:.1f}, {model_b} {result.words_b:.1f}")
    decisive = result.wins_a + result.wins_b
    typer.echo(
        f"head to head ({result.judge} judge): {model_b} won {result.wins_b} of {decisive} decisive "
        f"({result.win_rate_b:.0%})"
    )


def parse_settings(items: List[str]) -> dict:
    """--set KEY=VALUE items as a dict; values are YAML, so numbers and booleans keep their types."""
    import yaml

    overrides = {}
    for item in items:
        key, separator, value = item.partition("=")
        if not separator or not key.strip():
            raise LoraflowError(f"--set takes KEY=VALUE, e.g. --set max_steps=30; got {item!r}.")
        try:
            overrides[key.strip().replace("-", "_")] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise LoraflowError(
                f"--set {item}: the value is not valid YAML; quote it, e.g. --set {key}='{value}'."
            ) from None
    return overrides


def loop(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The adapter to improve from its arena votes."),
    votes: Optional[str] = VOTES_OPTION,
    votes_needed: int = setting_option(LoopSettings, "votes_needed", "--votes-needed"),
    gate: bool = typer.Option(True, "--gate/--no-gate", help=help_of(LoopSettings, "gate")),
    gate_level: float = setting_option(GateSettings, "level", "--gate-level"),
    gate_threshold: float = setting_option(GateSettings, "threshold", "--gate-threshold"),
    gate_min_votes: int = setting_option(GateSettings, "min_votes", "--gate-min-votes"),
    gate_max_votes: int = setting_option(GateSettings, "max_votes", "--gate-max-votes"),
    base: str = setting_option(LoopSettings, "base", "--base"),
    trainer: str = setting_option(LoopSettings, "trainer", "--trainer"),
    hygiene: bool = HYGIENE_OPTION,
    balance_lengths: bool = setting_option(LoopSettings, "balance_lengths", "--balance-lengths"),
    set_values: List[str] = typer.Option(
        [],
        "--set",
        help="Trainer setting KEY=VALUE, e.g. --set max_steps=30 (repeatable); checked at start. The loop's own "
        "defaults, under these: "
        + "; ".join(f"{t}: " + ", ".join(f"{k}={v:g}" for k, v in d.items()) for t, d in LOOP_TRAINING.items()),
    ),
    poll_s: float = setting_option(LoopSettings, "poll_s", "--poll"),
    backoff_s: float = setting_option(LoopSettings, "backoff_s", "--backoff"),
    max_backoff_s: float = setting_option(LoopSettings, "max_backoff_s", "--max-backoff"),
    once: bool = typer.Option(
        False, "--once", help="Take one step and exit (for cron jobs and tests); exit 1 if training failed."
    ),
):
    """Watch the votes; after enough of them, train a candidate from the live version, and let the gate promote or
    reject it; roll a live version back once its votes show it worse than its parent."""
    settings = LoopSettings(
        name=name,
        votes_needed=votes_needed,
        gate=GateSettings(gate_level, gate_threshold, gate_min_votes, gate_max_votes) if gate else None,
        base=base,
        trainer=trainer,
        hygiene=HygieneSettings() if hygiene else None,
        balance_lengths=balance_lengths,
        training_overrides=parse_settings(set_values),
        poll_s=poll_s,
        backoff_s=backoff_s,
        max_backoff_s=max_backoff_s,
    )
    config = trainer_config(settings.trainer, settings.training_overrides)  # before anything is opened or created
    from loraflow.arena.loop import TRAIN_FAILED, FeedbackLoop  # imported after the check, so a typo fails fast
    from loraflow.arena.votes import VoteStore

    feedback = FeedbackLoop(settings, registry_from(ctx), VoteStore(votes, rate_limit=None), config=config)

    def report(event):
        timings = " ".join(f"{stage}={seconds:.1f}s" for stage, seconds in event.timings_s.items())
        typer.echo(f"[{event.action}] {event.detail} {timings}".rstrip(), err=True)

    last = feedback.run(max_steps=1 if once else None, on_event=report)
    if once and last is not None and last.action == TRAIN_FAILED:
        raise typer.Exit(1)


@hookimpl
def register_commands(cli: click.Group) -> None:
    app = typer.Typer()
    app.command("arena")(arena)
    app.command("loop")(loop)
    app.command("judge")(judge)
    votes_app = typer.Typer(
        name="votes", help="Arena votes: simulate, rank, export and push them as preference data.", no_args_is_help=True
    )
    votes_app.command("export")(votes_export)
    votes_app.command("push")(votes_push)
    votes_app.command("simulate")(votes_simulate)
    votes_app.command("leaderboard")(votes_leaderboard)
    commands = typer.main.get_command(app)
    for name in ("arena", "loop", "judge"):
        cli.add_command(commands.get_command(None, name), name)
    cli.add_command(typer.main.get_command(votes_app), "votes")
