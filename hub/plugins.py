"""The plugin manager: trainers come from the `loraflow` entry-point group, built-ins included.

Entry points load lazily, on the first call that needs a trainer, and once per process. A plugin
that fails to import is recorded with its error instead of stopping the CLI. `LORAFLOW_PLUGINS`,
a comma-separated allowlist of entry-point or distribution names, limits which external plugins load.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from importlib import metadata

import pluggy

from hub import hookspecs
from hub.errors import LoraflowError

GROUP = "loraflow"
OWN_DISTRIBUTION = "loraflow"
REQUIRED_ATTRIBUTES = ("name", "description", "config_class", "data_format", "train")


@dataclass(frozen=True)
class PluginSource:
    """Where a plugin came from: its entry point and the distribution that declared it."""

    entry_point: str
    package: str
    version: str


@dataclass(frozen=True)
class TrainerInfo:
    name: str
    trainer_class: type
    description: str
    source: PluginSource


@dataclass(frozen=True)
class PluginFailure:
    source: PluginSource
    error: str


@dataclass
class PluginSet:
    manager: pluggy.PluginManager
    trainers: dict[str, TrainerInfo] = field(default_factory=dict)
    failures: list[PluginFailure] = field(default_factory=list)

    def trainer(self, name: str) -> TrainerInfo:
        if name not in self.trainers:
            known = ", ".join(sorted(self.trainers)) or "none"
            raise LoraflowError(
                f"no trainer named {name!r}; installed trainers: {known}. "
                "Install a plugin with: loraflow plugins install PACKAGE"
            )
        return self.trainers[name]


def _allowed(source: PluginSource) -> bool:
    allowlist = os.environ.get("LORAFLOW_PLUGINS")
    if source.package == OWN_DISTRIBUTION or allowlist is None:
        return True
    names = {item.strip() for item in allowlist.split(",") if item.strip()}
    return source.entry_point in names or source.package in names


def _source(entry_point: metadata.EntryPoint) -> PluginSource:
    distribution = entry_point.dist
    return PluginSource(
        entry_point=entry_point.name,
        package=distribution.metadata["Name"] if distribution else "unknown",
        version=distribution.version if distribution else "unknown",
    )


def _unique_entry_points() -> list[metadata.EntryPoint]:
    """One entry point per (distribution, name), even when a path appears twice on sys.path."""
    seen, unique = set(), []
    for entry_point in metadata.entry_points(group=GROUP):
        key = (_source(entry_point).package, entry_point.name)
        if key not in seen:
            seen.add(key)
            unique.append(entry_point)
    return unique


@functools.cache
def get_plugins() -> PluginSet:
    """Load every allowed entry point once and collect the trainers they register."""
    manager = pluggy.PluginManager(GROUP)
    manager.add_hookspecs(hookspecs)
    result = PluginSet(manager)
    sources: dict[str, PluginSource] = {}
    for entry_point in _unique_entry_points():
        source = _source(entry_point)
        if not _allowed(source):
            continue
        plugin_name = f"{source.package}:{entry_point.name}"
        try:
            manager.register(entry_point.load(), name=plugin_name)
        except Exception as error:  # a broken plugin must not break the CLI
            result.failures.append(PluginFailure(source, f"{type(error).__name__}: {error}"))
            continue
        sources[plugin_name] = source
    manager.check_pending()
    for plugin_name, source in sources.items():
        others = [plugin for name, plugin in manager.list_name_plugin() if name != plugin_name]
        caller = manager.subset_hook_caller("register_trainers", remove_plugins=others)
        try:
            caller(register=functools.partial(_add_trainer, result, source))
        except Exception as error:
            result.failures.append(PluginFailure(source, f"{type(error).__name__}: {error}"))
    return result


def _add_trainer(result: PluginSet, source: PluginSource, trainer_class: type) -> None:
    missing = [attribute for attribute in REQUIRED_ATTRIBUTES if not hasattr(trainer_class, attribute)]
    if missing:
        raise LoraflowError(f"trainer class {trainer_class.__qualname__} lacks {', '.join(missing)}")
    name = trainer_class.name
    if name in result.trainers:
        other = result.trainers[name].source
        raise LoraflowError(f"trainer {name!r} is already registered by {other.package} {other.version}")
    first_line = (trainer_class.description or "").strip().splitlines()[0] if trainer_class.description else ""
    result.trainers[name] = TrainerInfo(name, trainer_class, first_line, source)


def reset_plugins() -> None:
    """Forget what was loaded, so a newly installed plugin is discovered."""
    get_plugins.cache_clear()
