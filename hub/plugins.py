"""The plugin manager: trainers and judges come from the `loraflow` entry-point group, built-ins included.

Entry points load lazily, on the first call that needs a trainer or a judge, and once per process. A plugin
that fails to import is recorded with its error instead of stopping the CLI. `LORAFLOW_PLUGINS`,
a comma-separated allowlist of entry-point or distribution names, limits which external plugins load; a name
that matches nothing installed is recorded as a failure, so a typo is reported rather than silently ignored.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from importlib import metadata

import pluggy

from loraflow.hub import hookspecs
from loraflow.hub.errors import LoraflowError

GROUP = "loraflow"
OWN_DISTRIBUTION = "loraflow"
REQUIRED_ATTRIBUTES = ("name", "description", "config_class", "data_format", "train")
REQUIRED_JUDGE_ATTRIBUTES = ("name", "description", "judge")


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
class JudgeInfo:
    name: str
    judge_class: type
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
    judges: dict[str, JudgeInfo] = field(default_factory=dict)
    failures: list[PluginFailure] = field(default_factory=list)

    def trainer(self, name: str) -> TrainerInfo:
        if name not in self.trainers:
            known = ", ".join(sorted(self.trainers)) or "none"
            raise LoraflowError(
                f"no trainer named {name!r}; installed trainers: {known}. "
                "Install a plugin with: loraflow plugins install PACKAGE"
            )
        return self.trainers[name]

    def judge(self, name: str) -> JudgeInfo:
        if name not in self.judges:
            known = ", ".join(sorted(self.judges)) or "none"
            raise LoraflowError(
                f"no judge named {name!r}; installed judges: {known}. "
                "Install a plugin with: loraflow plugins install PACKAGE"
            )
        return self.judges[name]


def _allowlist() -> set[str] | None:
    """The LORAFLOW_PLUGINS names, normalised; None when the variable is unset (every plugin loads)."""
    allowlist = os.environ.get("LORAFLOW_PLUGINS")
    if allowlist is None:
        return None
    return {_normalized(item) for item in allowlist.split(",") if item.strip()}


def _normalized(name: str) -> str:
    """Distribution names compare as pip compares them (PEP 503): loraflow_identity is loraflow-identity."""
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


def _allowed(source: PluginSource, allowlist: set[str] | None) -> bool:
    if source.package == OWN_DISTRIBUTION or allowlist is None:
        return True
    return bool(_names(source) & allowlist)


def _names(source: PluginSource) -> set[str]:
    return {_normalized(source.entry_point), _normalized(source.package)}


def _unmatched(allowlist: set[str], sources: list[PluginSource]) -> list[PluginFailure]:
    """Allowlisted names that no installed loraflow entry point or distribution answers to, e.g. a typo."""
    known = set().union(*(_names(source) for source in sources))
    failures = []
    for name in sorted(allowlist - known):
        try:
            metadata.distribution(name)
            why = f"{name} is installed but declares no [project.entry-points.loraflow] entry point"
        except metadata.PackageNotFoundError:
            why = f"no installed distribution or loraflow entry point is named {name}"
        error = f"LORAFLOW_PLUGINS names {name!r}, but {why}. Fix the name, or run: loraflow plugins install PACKAGE"
        failures.append(PluginFailure(PluginSource(entry_point=name, package=name, version="not found"), error))
    return failures


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
    """Load every allowed entry point once and collect the trainers and judges they register."""
    manager = pluggy.PluginManager(GROUP)
    manager.add_hookspecs(hookspecs)
    result = PluginSet(manager)
    sources: dict[str, PluginSource] = {}
    allowlist = _allowlist()
    entry_points = _unique_entry_points()
    if allowlist is not None:
        result.failures += _unmatched(allowlist, [_source(entry_point) for entry_point in entry_points])
    for entry_point in entry_points:
        source = _source(entry_point)
        if not _allowed(source, allowlist):
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
        for hook, add in (("register_trainers", _add_trainer), ("register_judges", _add_judge)):
            caller = manager.subset_hook_caller(hook, remove_plugins=others)
            try:
                caller(register=functools.partial(add, result, source))
            except Exception as error:
                result.failures.append(PluginFailure(source, f"{type(error).__name__}: {error}"))
    return result


def _first_line(text: str | None) -> str:
    return text.strip().splitlines()[0] if text and text.strip() else ""


def _checked(kind: str, required: tuple[str, ...], known: dict, plugin_class: type) -> str:
    """The class's name, once it has every required attribute and no other plugin registered that name."""
    missing = [attribute for attribute in required if not hasattr(plugin_class, attribute)]
    if missing:
        raise LoraflowError(f"{kind} class {plugin_class.__qualname__} lacks {', '.join(missing)}")
    name = plugin_class.name
    if name in known:
        other = known[name].source
        raise LoraflowError(f"{kind} {name!r} is already registered by {other.package} {other.version}")
    return name


def _add_trainer(result: PluginSet, source: PluginSource, trainer_class: type) -> None:
    name = _checked("trainer", REQUIRED_ATTRIBUTES, result.trainers, trainer_class)
    result.trainers[name] = TrainerInfo(name, trainer_class, _first_line(trainer_class.description), source)


def _add_judge(result: PluginSet, source: PluginSource, judge_class: type) -> None:
    name = _checked("judge", REQUIRED_JUDGE_ATTRIBUTES, result.judges, judge_class)
    result.judges[name] = JudgeInfo(name, judge_class, _first_line(judge_class.description), source)
