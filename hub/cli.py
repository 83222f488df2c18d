"""The `loraflow` command: parse, call one function, print."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import typing
from pathlib import Path
from typing import Optional

import click
import typer
from rich.console import Console
from rich.table import Table

from loraflow.hub.base import DEFAULT_BASE
from loraflow.hub.cli_common import registry_from
from loraflow.hub.data import DEFAULT_SPLIT, data_sources
from loraflow.hub.errors import LoraflowError

console = Console()
errors = Console(stderr=True)

app = typer.Typer(
    help="Train, publish, serve, vote on and retrain LoRA adapters for one base model.", no_args_is_help=True
)
base_app = typer.Typer(help="Base models: pull and convert them once into the cache.", no_args_is_help=True)
plugins_app = typer.Typer(help="Trainer plugins: list what is installed, install more.", no_args_is_help=True)
registry_app = typer.Typer(
    help="The adapter registry: versions, lineage, hashes, metrics, aliases.", no_args_is_help=True
)
app.add_typer(base_app, name="base")
app.add_typer(plugins_app, name="plugins")
app.add_typer(registry_app, name="registry")


from loraflow.hub.cli_hub import add_hub_commands  # noqa: E402

add_hub_commands(app)


@app.callback()
def root(
    ctx: typer.Context,
    registry: Optional[str] = typer.Option(
        None,
        "--registry",
        envvar="LORAFLOW_REGISTRY",
        help="Registry file (default: ./registry.json); `loraflow serve` also takes the URL of a `loraflow hub serve`.",
    ),
):
    ctx.obj = {"registry": registry}


@base_app.command("pull")
def base_pull(name: str = typer.Argument(DEFAULT_BASE, help="Alias, local folder, .gguf file or Hub id.")):
    """Resolve a base model to a local safetensors folder and print its fingerprint."""
    from loraflow.hub.base import resolve_base

    base = resolve_base(name)
    console.print(
        f"[green]base ready[/] {base.name} ({base.hub_id})\n  path: {base.path}\n  fingerprint: {base.fingerprint}"
    )


@plugins_app.command("list")
def plugins_list():
    """Show each trainer and judge with its package, version and description, and any plugin that failed to load."""
    from loraflow.hub.plugins import get_plugins

    plugins = get_plugins()
    table = Table("trainer", "package", "version", "data", "description")
    for name, info in sorted(plugins.trainers.items()):
        table.add_row(name, info.source.package, info.source.version, info.trainer_class.data_format, info.description)
    console.print(table)
    judges = Table("judge", "package", "version", "description")
    for name, info in sorted(plugins.judges.items()):
        judges.add_row(name, info.source.package, info.source.version, info.description)
    console.print(judges)
    for failure in plugins.failures:
        errors.print(
            f"[red]plugin {failure.source.entry_point} ({failure.source.package} {failure.source.version}) "
            f"failed to load:[/] {failure.error}"
        )


@plugins_app.command("install")
def plugins_install(
    spec: list[str] = typer.Argument(
        ..., help="A package name, requirement, wheel or folder; pip options may follow '--'."
    ),
):
    """pip-install a plugin into this environment, then confirm its trainers or judges are discovered."""
    before = _discovered()
    if subprocess.call([sys.executable, "-m", "pip", "install", *spec]) != 0:
        raise LoraflowError(f"pip could not install {' '.join(spec)}; see pip's message above.")
    after = _discovered()
    added = {kind: sorted(set(after[kind]) - set(before[kind])) for kind in after}
    if not any(added.values()):
        raise LoraflowError(
            f"{' '.join(spec)} installed, but it registers no new trainer or judge. A plugin declares an entry point "
            "in the [project.entry-points.loraflow] table of its pyproject.toml."
        )
    for kind, names in added.items():
        if names:
            console.print(f"[green]new {kind}:[/] {', '.join(names)}")


def _discovered() -> dict[str, list[str]]:
    """The trainers and judges a fresh interpreter finds: it sees packages installed after this one started."""
    code = (
        "import json; from loraflow.hub.plugins import get_plugins; p = get_plugins(); "
        "print(json.dumps({'trainers': sorted(p.trainers), 'judges': sorted(p.judges)}))"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


@registry_app.command("publish")
def registry_publish(
    ctx: typer.Context,
    folder: Path = typer.Argument(
        ..., help="A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors)."
    ),
    name: str = typer.Option(..., "--name", help="Adapter name; the new version is NAME@N."),
    base: str = typer.Option(DEFAULT_BASE, "--base", help="The base model the adapter was trained on."),
    parent: Optional[str] = typer.Option(None, "--parent", help="The version it continues from, NAME@V."),
    promote: bool = typer.Option(
        False, "--promote", help="Make it the live version (what NAME serves) in the same write."
    ),
):
    """Publish an adapter trained elsewhere as the next version of NAME (a candidate unless --promote)."""
    from loraflow.hub.base import resolve_base

    version = registry_from(ctx).publish(
        folder,
        name,
        base=resolve_base(base),
        parent=parent,
        trainer={"name": "external"},
        promote=promote,
        actor="registry publish",
    )
    _print_published(version)


@registry_app.command("publish-prompt")
def registry_publish_prompt(
    ctx: typer.Context,
    name: str = typer.Option(..., "--name", help="The prompt's name; the new version is NAME@N."),
    system_prompt: Optional[str] = typer.Option(None, "--system-prompt", help="The system prompt's text."),
    from_file: Optional[Path] = typer.Option(
        None, "--from-file", help="A UTF-8 text file holding the system prompt.", exists=True, dir_okay=False
    ),
    base: str = typer.Option(DEFAULT_BASE, "--base", help="The base model the prompt is written for."),
    parent: Optional[str] = typer.Option(None, "--parent", help="The prompt version it revises, NAME@V."),
    promote: bool = typer.Option(False, "--promote", help="Make it the live version in the same write."),
):
    """Publish a system prompt on the base as a contestant: the server answers NAME with the base following it, so
    the arena, the leaderboard and `loraflow judge` show whether an adapter beats plain prompt engineering."""
    from loraflow.hub.base import resolve_base

    if (system_prompt is None) == (from_file is None):
        raise LoraflowError("give the system prompt with exactly one of --system-prompt TEXT or --from-file FILE.")
    text = system_prompt if from_file is None else from_file.read_text(encoding="utf-8")
    version = registry_from(ctx).publish_prompt(
        text, name, base=resolve_base(base), parent=parent, promote=promote, actor="registry publish-prompt"
    )
    _print_published(version)


def _print_published(version) -> None:
    console.print(f"[green]published[/] {version.ref} ({version.state})")
    if version.state != "live":
        console.print(
            f"  {version.name} still serves the live version; `loraflow promote {version.ref}` makes this one live."
        )


@registry_app.command("list")
def registry_list(ctx: typer.Context):
    """Every adapter with its versions, their states, and its aliases."""
    snapshot = registry_from(ctx).snapshot()
    table = Table("name", "live", "versions (state)", "aliases", "kind", "base", "trainer")
    for name in snapshot.names():
        versions = snapshot.versions(name)
        live = snapshot.live(name)
        latest = versions[-1]
        states = ", ".join(f"{v.version} {v.state}" for v in versions)
        aliases = ", ".join(f"{alias}→{v}" for alias, v in sorted(snapshot.aliases(name).items()))
        canary = snapshot.canary(name)
        table.add_row(
            name,
            (live.ref if live else "-") + (f" ({canary.version.ref} canary {canary.percent:g}%)" if canary else ""),
            states,
            aliases,
            latest.kind,
            latest.base["name"],
            latest.trainer.get("name", ""),
        )
    console.print(table)
    console.print(f"[dim]{snapshot.source}[/]")


@registry_app.command("history")
def registry_history(ctx: typer.Context, name: str = typer.Argument(..., help="The adapter name.")):
    """Every lifecycle step of NAME: publish, promote, reject, rollback, retire, failed trainings; who and why."""
    table = Table("time (UTC)", "action", "version", "replaced", "actor", "reason")
    table.columns[0].no_wrap = True
    for event in registry_from(ctx).history(name):
        version = f"{name}@{event.version}" if event.version is not None else ""
        replaced = f"{name}@{event.previous}" if event.previous is not None else ""
        when = event.time.replace("T", " ").removesuffix("+00:00")
        table.add_row(when, event.action, version, replaced, event.actor, event.reason)
    console.print(table)


@registry_app.command("show")
def registry_show(ctx: typer.Context, ref: str = typer.Argument(..., help="NAME, NAME@V or NAME@ALIAS.")):
    """Print one version's full record as JSON, with its lineage."""
    registry = registry_from(ctx)
    version = registry.get(ref)
    record = dataclasses.asdict(version)
    record["folder"] = str(registry.folder(version))
    record["lineage"] = [v.ref for v in registry.lineage(version.ref)]
    console.print_json(json.dumps(record))


@registry_app.command("alias")
def registry_alias(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="NAME@V"),
    alias: str = typer.Argument(..., help="e.g. production"),
):
    """Point ALIAS at a version."""
    version = registry_from(ctx).set_alias(ref, alias)
    console.print(f"[green]{version.name}@{alias}[/] → {version.ref}")


@registry_app.command("retire")
def registry_retire(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="NAME@V, not the live version."),
    reason: str = typer.Option("", "--reason", help="Why, for the history."),
):
    """Mark a version done with (no longer a candidate for promotion); NAME@V still reaches it."""
    version = registry_from(ctx).retire(ref, actor="registry retire", reason=reason)
    console.print(f"[green]{version.ref}[/] retired")


def promote(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="NAME@V (or NAME@ALIAS) to make live."),
    reason: str = typer.Option("", "--reason", help="Why, for the history."),
    canary: Optional[float] = typer.Option(
        None,
        "--canary",
        min=0,
        max=100,
        help="Send this percentage of NAME's requests to NAME@V and the rest to the live version, until a promote "
        "(it passed) or `loraflow rollback NAME` (it failed) ends the canary.",
    ),
):
    """Make NAME@V the live version: every server answers NAME with it from the next request, no restart. With a
    `loraflow serve --replicas` fleet running on this registry, it returns once every replica serves it."""
    registry = registry_from(ctx)
    before = registry.live(ref.partition("@")[0])
    if canary is not None:
        version = registry.start_canary(ref, canary, actor="promote", reason=reason)
        console.print(
            f"[green]{version.name}[/] → {version.ref} for {canary:g}% of requests (canary), "
            f"{before.ref} for the rest; `loraflow promote {version.ref}` or `loraflow rollback {version.name}` ends it"
        )
        return
    version = registry.promote(ref, actor="promote", reason=reason)
    console.print(
        f"[green]{version.name}[/] → {version.ref} (live)"
        + (f", was {before.ref}" if before and before.ref != version.ref else "")
    )


def rollback(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The adapter name."),
    reason: str = typer.Option("", "--reason", help="Why, for the history."),
):
    """Reject the live version and make the one it replaced live again (during a canary: reject the canary version
    and keep the live one); servers switch with no restart (and a running `loraflow serve --replicas` fleet before
    this returns)."""
    registry = registry_from(ctx)
    snapshot = registry.snapshot()
    canary = snapshot.canary(name) if snapshot.has(name) else None
    before = canary.version if canary else registry.live(name)
    version = registry.rollback(name, actor="rollback", reason=reason)
    console.print(f"[green]{name}[/] → {version.ref} (live); {before.ref if before else '?'} rejected")


app.command("promote")(promote)
app.command("rollback")(rollback)


@registry_app.command("rm")
def registry_rm(ctx: typer.Context, ref: str = typer.Argument(..., help="NAME@V")):
    """Remove one version and its files."""
    if "@" not in ref:
        raise LoraflowError(f"give the exact version to remove, e.g. {ref}@1")
    version = registry_from(ctx).remove(ref)
    console.print(f"[green]removed[/] {version.ref}")


class TrainGroup(click.Group):
    """`loraflow train TRAINER`: one subcommand per installed trainer, its options built from its config."""

    def list_commands(self, ctx):
        from loraflow.hub.plugins import get_plugins

        return sorted(get_plugins().trainers)

    def get_command(self, ctx, name):
        from loraflow.hub.plugins import get_plugins

        info = get_plugins().trainers.get(name)
        return _train_command(info) if info else None


def _click_type(annotation) -> tuple[click.ParamType, str]:
    text = str(annotation)
    if annotation in (int, "int") or text == "int":
        return click.INT, "INT"
    if annotation in (float, "float") or text == "float":
        return click.FLOAT, "FLOAT"
    if annotation in (bool, "bool") or text == "bool":
        return click.BOOL, "BOOL"
    return click.STRING, "TEXT"


def _train_command(info) -> click.Command:
    config_class = info.trainer_class.config_class
    hints = typing.get_type_hints(config_class)
    params = [
        click.Option(
            ["--data"],
            required=True,
            help=(
                f"Training data: {data_sources(info.trainer_class.data_format)} (from HF_ENDPOINT). ShareGPT, Alpaca "
                "and UltraFeedback-style layouts are mapped automatically."
            ),
        ),
        click.Option(
            ["--split"],
            default=DEFAULT_SPLIT,
            show_default=True,
            help="The split of a Hub dataset id to train on; datasets' slices work too, e.g. 'train[:1000]'.",
        ),
        click.Option(["--subset"], default=None, help="The subset (config name) of a Hub dataset id that has several."),
        click.Option(["--name"], required=True, help="Adapter name; the result is published as NAME@N."),
        click.Option(
            ["--base"], default=DEFAULT_BASE, show_default=True, help="Base model: alias, folder, .gguf or Hub id."
        ),
        click.Option(["--parent"], default=None, help="Continue from this registry version (NAME@V)."),
        click.Option(
            ["--promote"], is_flag=True, help="Make the new version live (what NAME serves) when it is published."
        ),
        click.Option(
            ["--config", "config_file"],
            default=None,
            type=click.Path(dir_okay=False),
            help="YAML file of hyperparameters; flags override it.",
        ),
    ]
    from loraflow.hub.training import config_fields

    for field in config_fields(config_class):
        param_type, _ = _click_type(hints[field.name])
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        shown = ",".join(default) if isinstance(default, list) else default
        params.append(
            click.Option(
                ["--" + field.name.replace("_", "-"), field.name],
                type=param_type,
                default=None,
                help=f"{field.metadata.get('help', '')} [default: {shown}]",
            )
        )

    def callback(data, split, subset, name, base, parent, promote, config_file, **overrides):
        from loraflow.hub.training import load_config, run_training

        config = load_config(config_class, config_file, overrides)
        registry = registry_from(click.get_current_context())
        version = run_training(
            info.name,
            data=data,
            split=split,
            subset=subset,
            name=name,
            base_spec=base,
            registry=registry,
            config=config,
            parent=parent,
            promote=promote,
            actor=f"train {info.name}",
        )
        from accelerate import PartialState

        if PartialState().is_main_process:  # under `accelerate launch` every rank returns; one reports
            _print_published(version)
            console.print_json(json.dumps({"metrics": version.metrics, "path": version.path, "parent": version.parent}))

    return click.Command(
        info.name,
        params=params,
        callback=callback,
        help=f"{info.description}\n\nFrom {info.source.package} {info.source.version}.",
    )


def build_cli():
    """The root command: our Typer app, the per-trainer `train` group, and commands that plugins register."""
    from loraflow.hub.plugins import get_plugins

    command = typer.main.get_command(app)
    command.add_command(
        TrainGroup(
            name="train", help="Train an adapter with an installed trainer and publish it.", no_args_is_help=True
        )
    )
    get_plugins().manager.hook.register_commands(cli=command)
    return command


# Typer vendors its own click, whose usage errors (a value out of range, a file that does not exist) do not derive
# from the installed click's ClickException; catch both.
CLICK_ERRORS = (
    click.ClickException,
    next(kind for kind in typer.BadParameter.__mro__ if kind.__name__ == "ClickException"),
)


def main() -> None:
    command = build_cli()
    try:
        command.main(prog_name="loraflow", standalone_mode=False)
    except click.exceptions.Exit as exit_:
        sys.exit(exit_.exit_code)
    except CLICK_ERRORS as error:  # a bad option value or a missing argument: click's one-line usage error
        error.show()
        sys.exit(error.exit_code)
    except click.exceptions.Abort:
        errors.print("aborted")
        sys.exit(1)
    except LoraflowError as error:
        errors.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
