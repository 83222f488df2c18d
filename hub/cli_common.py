"""What every `loraflow` command shares: the registry that --registry names, and option defaults read from the
settings dataclasses, so each default and help text is written once."""

from __future__ import annotations

import dataclasses

import click


def registry_from(ctx: click.Context):
    """The registry file that --registry (or LORAFLOW_REGISTRY) names, for any command."""
    from loraflow.hub.registry import Registry

    return Registry((ctx.find_root().obj or {}).get("registry"))


def _field(settings_class: type, name: str) -> dataclasses.Field:
    return {f.name: f for f in dataclasses.fields(settings_class)}[name]


def default_of(settings_class: type, name: str):
    """The declared default of one field of a settings dataclass."""
    declared = _field(settings_class, name)
    if declared.default_factory is not dataclasses.MISSING:
        return declared.default_factory()
    return declared.default


def help_of(settings_class: type, name: str) -> str:
    return _field(settings_class, name).metadata["help"]
