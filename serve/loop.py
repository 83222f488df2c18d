"""The feedback loop: arena votes on the live version become its successor, trained with DPO and swapped in.

Everything the loop decides is derived from the registry and the vote store, so a loop process can die at
any point and the next one carries on from what is recorded:
- the live version is the `live` alias (the server answers NAME with it when started with `--alias live`);
- votes already learned from are those up to the `last_seq` in the provenance of a child of the live version;
- a candidate is a newer version whose parent is live; without a gate it is promoted at once, with a gate
  the arena pairs it with its parent until `gate_votes` head-to-head votes decide.
A file lock beside the registry lets only one retrain run at a time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout

from hub.base import cache_dir
from hub.errors import LoraflowError
from hub.registry import AdapterVersion, Registry
from serve.export import export_preferences
from serve.matchmaking import head_to_head
from serve.rounds import LIVE_ALIAS, is_rejected, live_version
from serve.votes import DECISIVE, Vote, VoteStore


@dataclass
class LoopSettings:
    name: str
    votes_needed: int = field(default=100, metadata={"help": "Decisive votes on the live version that start a retrain."})
    min_win_rate: float | None = field(default=None, metadata={"help": "Promote only when the new version wins this share of its decisive votes against its parent."})
    gate_votes: int = field(default=20, metadata={"help": "Decisive head-to-head votes the gate waits for."})
    base: str = "smollm2-135m"
    trainer: str = "dpo"
    training_overrides: dict = field(default_factory=dict)
    poll_s: float = 5.0

    def __post_init__(self) -> None:
        if self.votes_needed < 1:
            raise LoraflowError("votes_needed must be at least 1.")
        if self.min_win_rate is not None and not 0 < self.min_win_rate < 1:
            raise LoraflowError("min_win_rate must be between 0 and 1 (for example 0.55).")


@dataclass
class LoopEvent:
    """What one step did: waited, trained, promoted, rejected, or found another loop busy."""

    action: str
    detail: str
    version: str | None = None
    timings_s: dict[str, float] = field(default_factory=dict)


def learned_up_to(registry: Registry, parent: AdapterVersion) -> int:
    """The last vote seq any child of `parent` was trained on; later votes are new."""
    children = [v for v in registry.versions(parent.name) if v.parent == parent.ref]
    return max((v.provenance.get("votes", {}).get("last_seq", 0) for v in children), default=0)


def pending_votes(registry: Registry, store: VoteStore, live: AdapterVersion) -> list[Vote]:
    after = learned_up_to(registry, live)
    return [v for v in store.votes(contestants=[live.ref], after_seq=after) if v.outcome in DECISIVE]


def candidate(registry: Registry, live: AdapterVersion) -> AdapterVersion | None:
    newest = registry.get(f"{live.name}@latest")
    if newest.version > live.version and newest.parent == live.ref and not is_rejected(newest):
        return newest
    return None


def win_rate(votes: list[Vote], contestant: str) -> tuple[float, int]:
    decisive = [v for v in votes if v.outcome in DECISIVE]
    wins = sum(v.winner == contestant for v in decisive)
    return (wins / len(decisive) if decisive else 0.0), len(decisive)


class FeedbackLoop:
    def __init__(self, settings: LoopSettings, registry: Registry, store: VoteStore):
        self.settings = settings
        self.registry = registry
        self.store = store
        self.lock = FileLock(str(registry.path) + f".loop-{settings.name}.lock")

    def live(self) -> AdapterVersion:
        """The live version; on the first run the alias is pinned to the latest, so it is explicit from now on."""
        if LIVE_ALIAS not in self.registry.aliases(self.settings.name):
            self.registry.set_alias(f"{self.settings.name}@latest", LIVE_ALIAS)
        return live_version(self.registry, self.settings.name)

    def step(self) -> LoopEvent:
        try:
            with self.lock.acquire(timeout=0):
                return self._step()
        except Timeout:
            return LoopEvent("busy", f"another loop holds {self.lock.lock_file}; one retrain runs at a time.")

    def _step(self) -> LoopEvent:
        live = self.live()
        waiting = candidate(self.registry, live)
        if waiting is not None:
            return self._judge_candidate(waiting, live)
        votes = pending_votes(self.registry, self.store, live)
        if len(votes) < self.settings.votes_needed:
            return LoopEvent("wait", f"{live.ref} has {len(votes)}/{self.settings.votes_needed} new decisive votes.", live.ref)
        trained, timings = self._train(live, votes)
        if self.settings.min_win_rate is None:
            started = time.perf_counter()
            self.registry.set_alias(trained.ref, LIVE_ALIAS)
            timings["promote"] = time.perf_counter() - started
            return LoopEvent("promoted", f"trained {trained.ref} from {live.ref} on {len(votes)} votes; now live.", trained.ref, timings)
        return LoopEvent("trained", f"trained {trained.ref}; the arena pairs it with {live.ref} until the gate decides.", trained.ref, timings)

    def _judge_candidate(self, new: AdapterVersion, live: AdapterVersion) -> LoopEvent:
        if self.settings.min_win_rate is None:
            self.registry.set_alias(new.ref, LIVE_ALIAS)
            return LoopEvent("promoted", f"{new.ref} (trained before this run) is now live.", new.ref)
        rate, decided = win_rate(head_to_head(self.store.votes(contestants=[new.ref]), new.ref, live.ref), new.ref)
        if decided < self.settings.gate_votes:
            return LoopEvent("wait", f"{new.ref} vs {live.ref}: {decided}/{self.settings.gate_votes} decisive votes for the gate.", new.ref)
        self.registry.record_metrics(new.ref, {"arena_win_rate_vs_parent": rate, "arena_gate_votes": decided})
        if rate >= self.settings.min_win_rate:
            self.registry.set_alias(new.ref, LIVE_ALIAS)
            return LoopEvent("promoted", f"{new.ref} won {rate:.0%} of {decided} votes against {live.ref}; now live.", new.ref)
        self.registry.record_metrics(new.ref, {"gate": "rejected"})
        return LoopEvent("rejected", f"{new.ref} won {rate:.0%} of {decided} votes (< {self.settings.min_win_rate:.0%}); {live.ref} stays live.", new.ref)

    def _train(self, live: AdapterVersion, votes: list[Vote]) -> tuple[AdapterVersion, dict[str, float]]:
        from hub.plugins import get_plugins
        from hub.training import load_config, run_training

        timings: dict[str, float] = {}
        started = time.perf_counter()
        first, last = votes[0].seq, votes[-1].seq
        data = Path(cache_dir()) / "loop" / f"{live.name}-v{live.version}-votes-{first}-{last}.jsonl"
        report = export_preferences(votes, data)
        timings["export"] = time.perf_counter() - started
        started = time.perf_counter()
        config_class = get_plugins().trainer(self.settings.trainer).trainer_class.config_class
        trained = run_training(
            self.settings.trainer,
            data=data,
            name=live.name,
            base_spec=self.settings.base,
            registry=self.registry,
            config=load_config(config_class, None, self.settings.training_overrides),
            parent=live.ref,
            provenance={"source": "arena votes", "votes": {"first_seq": first, "last_seq": last, "pairs": report.pairs}},
        )
        timings["train_and_publish"] = time.perf_counter() - started
        return trained, timings

    def run(self, max_steps: int | None = None, on_event=print) -> None:
        """Step, report, sleep `poll_s` between polls of the vote store; forever unless `max_steps`."""
        steps = 0
        while max_steps is None or steps < max_steps:
            event = self.step()
            on_event(event)
            steps += 1
            if event.action in ("wait", "busy"):
                time.sleep(self.settings.poll_s)
