"""The feedback loop: arena votes on the live version become its successor, trained (DPO by default) and gated.

Everything the loop decides is derived from the registry and the vote store, so a loop process can die at
any point and the next one carries on from what is recorded:
- the live version is the registry's live state (the server answers a bare NAME with it);
- votes already learned from are those up to the `last_seq` in the provenance of a child of the live version;
- the candidate is the newest version in state candidate whose parent is live; without a gate it is promoted at
  once, with one (loraflow.arena.gate) the arena pairs it with its parent until their votes promote or reject it;
- a live version whose head-to-head votes show it worse than its parent is rolled back, gate or not;
- failed trainings are `train-failed` events in the name's history; the ones in a row set the back-off.
A loop that only waits writes nothing. A file lock beside the registry lets only one retrain run at a time.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Sequence

from filelock import FileLock, Timeout

from loraflow.arena.export import EXPORT_FORMATS, balance_lengths, export_training_data
from loraflow.arena.gate import PROMOTE, ROLLBACK, UNDECIDED, Verdict, judge_candidate, watch_live
from loraflow.arena.hygiene import Excluded, screen
from loraflow.arena.screening import SetAside, screen_votes
from loraflow.arena.settings import GateSettings, LoopSettings, trainer_config
from loraflow.arena.votes import DECISIVE, OUTCOMES, HeadToHead, Vote, VoteStore
from loraflow.hub.base import cache_dir, resolve_base
from loraflow.hub.errors import LoraflowError
from loraflow.hub.plugins import get_plugins
from loraflow.hub.registry import CANDIDATE, AdapterVersion, HistoryEvent, Registry, RegistrySnapshot

__all__ = ["FeedbackLoop", "LoopEvent", "LoopSettings", "learned_up_to", "trainer_config"]

ACTOR = "loop"
TRAIN_FAILED = "train-failed"
IDLE_ACTIONS = ("wait", "busy", "backoff", TRAIN_FAILED)
LENGTH_BALANCE = "left out to balance answer lengths (--balance-lengths)"


@dataclass
class LoopEvent:
    """What one step did: waited, trained, promoted, rejected, failed to train, backed off, or found another loop."""

    action: str
    detail: str
    version: str | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    set_aside: int = 0
    retry_in_s: float = 0.0


def learned_up_to(registry: Registry | RegistrySnapshot, parent: AdapterVersion) -> int:
    """The last vote seq any child of `parent` was trained on; later votes are new."""
    children = [v for v in registry.versions(parent.name) if v.parent == parent.ref]
    return max((v.provenance.get("votes", {}).get("last_seq", 0) for v in children), default=0)


def pending_votes(
    registry: Registry | RegistrySnapshot, store: VoteStore, live: AdapterVersion, outcomes: Sequence[str] = DECISIVE
) -> list[Vote]:
    """The votes on the live version that no child of it has learned from, of the outcomes the trainer learns from."""
    after = learned_up_to(registry, live)
    return [v for v in store.votes(contestants=[live.ref], after_seq=after) if v.outcome in outcomes]


def candidate(snapshot: RegistrySnapshot, live: AdapterVersion) -> AdapterVersion | None:
    """The newest candidate trained from the live version: the one the gate judges."""
    waiting = [v for v in snapshot.versions(live.name) if v.state == CANDIDATE and v.parent == live.ref]
    return waiting[-1] if waiting else None


def gate_metrics(verdict: Verdict) -> dict[str, float]:
    estimate = verdict.estimate
    return {
        "arena_win_probability_vs_parent": estimate.probability,
        "arena_win_probability_low": estimate.low,
        "arena_win_probability_high": estimate.high,
        "arena_gate_votes": estimate.games,
    }


def failures_in_a_row(history: list[HistoryEvent]) -> tuple[int, datetime | None]:
    """Trainings that failed since anything else happened to the name, and when the last one failed."""
    count, last = 0, None
    for event in reversed(history):
        if event.action != TRAIN_FAILED:
            break
        count += 1
        last = last or datetime.fromisoformat(event.time)
    return count, last


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


class FeedbackLoop:
    """Checks its settings, the name and the base when built, so `loraflow loop` fails at start, not after waiting."""

    def __init__(self, settings: LoopSettings, registry: Registry, store: VoteStore, config=None):
        self.settings = settings
        self.config = config or trainer_config(settings.trainer, settings.training_overrides)
        self.registry = registry
        self.store = store
        registry.versions(settings.name)  # an unknown name fails here, listing the known ones
        self.base = resolve_base(settings.base)
        live = registry.live(settings.name)
        if live is not None and live.kind == "prompt":
            raise LoraflowError(
                f"{live.ref} is a prompt, and the loop trains adapters from the live one. Run the loop on an adapter's "
                f"name; the arena can still show {settings.name} beside it (`loraflow arena ADAPTER {settings.name}`)."
            )
        if live is not None and live.base["fingerprint"] != self.base.fingerprint:
            raise LoraflowError(
                f"{live.ref} was trained on {live.base['name']}, not on {self.base.name}; "
                f"pass --base {live.base['name']}."
            )
        self.data_format = get_plugins().trainer(settings.trainer).trainer_class.data_format
        if self.data_format not in EXPORT_FORMATS:
            raise LoraflowError(
                f"the {settings.trainer} trainer reads {self.data_format} data; votes become "
                f"{' or '.join(EXPORT_FORMATS)} data: the loop trains with dpo, kto, ppo or a plugin reading them."
            )
        # Pairs need a winner; unpaired feedback (kto) learns from ties and both-bad votes too.
        self.outcomes = DECISIVE if self.data_format == "preference" else OUTCOMES
        self.kind = "decisive votes" if self.data_format == "preference" else "votes"
        self.lock = FileLock(str(registry.path) + f".loop-{settings.name}.lock")
        self._tokenizer = None
        self._screened_votes: list[Vote] = []
        self._screened_seq = 0
        self._excluded: dict[str, Excluded] | None = None

    def backoff_after(self, failures: int) -> float:
        if failures == 0:
            return 0.0
        return min(self.settings.backoff_s * 2 ** (failures - 1), self.settings.max_backoff_s)

    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.base.path)
        return self._tokenizer

    def step(self) -> LoopEvent:
        try:
            with self.lock.acquire(timeout=0):
                return self._step()
        except Timeout:
            return LoopEvent("busy", f"another loop holds {self.lock.lock_file}; one retrain runs at a time.")

    def _step(self) -> LoopEvent:
        name, needed = self.settings.name, self.settings.votes_needed
        snapshot = self.registry.snapshot()
        live = snapshot.live(name)
        if live is None:
            return LoopEvent("wait", f"{name} has no live version; promote one with `loraflow promote {name}@V`.")
        rolled_back = self._watch(snapshot, live)
        if rolled_back is not None:
            return rolled_back
        waiting = candidate(snapshot, live)
        if waiting is not None:
            return self._judge_candidate(waiting, live)
        failures, last_failure = failures_in_a_row(snapshot.history(name))
        if last_failure is not None:
            retry_in = last_failure.timestamp() + self.backoff_after(failures) - time.time()
            if retry_in > 0:
                detail = f"training from {live.ref} failed {failures} time(s) in a row; next try in {retry_in:.0f} s."
                return LoopEvent("backoff", detail, live.ref, retry_in_s=retry_in)
        votes = pending_votes(snapshot, self.store, live, self.outcomes)
        if len(votes) < needed:
            return LoopEvent("wait", f"{live.ref} has {len(votes)}/{needed} new {self.kind}.", live.ref)
        excluded = self._excluded_by_hygiene()
        usable = [v for v in votes if v.vote_id not in excluded]
        trainable, set_aside = screen_votes(usable, self.tokenizer(), self.config.max_length, self.data_format)
        set_aside = [SetAside(e.vote_id, e.seq, e.reason) for v in votes if (e := excluded.get(v.vote_id))] + set_aside
        if self.settings.balance_lengths:
            trainable, unbalanced = balance_lengths(trainable, seed=live.version)
            set_aside += [SetAside(v.vote_id, v.seq, LENGTH_BALANCE) for v in unbalanced]
        if len(trainable) < needed:
            detail = f"{live.ref} has {len(trainable)}/{needed} new {self.kind} to train on; "
            detail += f"{len(set_aside)} set aside."
            return LoopEvent("wait", detail, live.ref, set_aside=len(set_aside))
        try:
            trained, timings = self._train(live, votes, trainable, set_aside)
        except Exception as error:  # any failure of one training: record it, back off, keep the loop alive
            return self._training_failed(live, error, len(set_aside))
        learned = f"trained {trained.ref} from {live.ref} on {len(trainable)} votes ({len(set_aside)} set aside)"
        if self.settings.gate is None:
            started = time.perf_counter()
            self.registry.promote(trained.ref, actor=ACTOR, reason=f"{learned}; no gate")
            timings["promote"] = time.perf_counter() - started
            return LoopEvent("promoted", f"{learned}; now live.", trained.ref, timings, len(set_aside))
        detail = f"{learned}; the arena pairs it with {live.ref} until the gate decides."
        return LoopEvent("trained", detail, trained.ref, timings, len(set_aside))

    def _head_to_head(self, first: str, second: str) -> HeadToHead:
        """The votes between two versions that count, from `first`'s side: what hygiene leaves out sways no gate."""
        if self.settings.hygiene is None:
            return self.store.head_to_head(first, second)
        excluded = self._excluded_by_hygiene()
        votes = [v for v in self.store.votes(between=(first, second)) if v.vote_id not in excluded]
        return HeadToHead.of(votes, first, second)

    def _excluded_by_hygiene(self) -> dict[str, Excluded]:
        """The votes vote hygiene leaves out, by id. Its rules read whole sessions, so it screens every vote, but
        only again when new votes arrived: a loop that polls an unchanged store reads only that nothing is new."""
        if self.settings.hygiene is None:
            return {}
        new = self.store.votes(after_seq=self._screened_seq)
        if new or self._excluded is None:
            self._screened_votes += new
            self._screened_seq = max([self._screened_seq, *(v.seq for v in new)])
            names = (self.base.served_name, self.base.hub_id)
            screened = screen(self._screened_votes, self.settings.hygiene, names)
            self._excluded = {e.vote_id: e for e in screened.excluded}
        return self._excluded

    def _training_failed(self, live: AdapterVersion, error: Exception, set_aside: int) -> LoopEvent:
        reason = one_line(error)
        self.registry.record_event(live.name, TRAIN_FAILED, actor=ACTOR, reason=reason, version=live.version)
        failures, _ = failures_in_a_row(self.registry.history(live.name))
        retry_in = self.backoff_after(failures)
        detail = f"training from {live.ref} failed ({reason}); "
        detail += f"failure {failures} in a row, next try in {retry_in:.0f} s."
        return LoopEvent(TRAIN_FAILED, detail, live.ref, set_aside=set_aside, retry_in_s=retry_in)

    def _judge_candidate(self, new: AdapterVersion, live: AdapterVersion) -> LoopEvent:
        gate = self.settings.gate
        if gate is None:
            reason = f"candidate trained from {live.ref}; no gate; rolled back if shown worse"
            self.registry.promote(new.ref, actor=ACTOR, reason=reason)
            return LoopEvent("promoted", f"{new.ref} (trained before this run) is now live.", new.ref)
        verdict = judge_candidate(self._head_to_head(new.ref, live.ref), gate)
        if verdict.action == UNDECIDED:  # a waiting step writes nothing
            detail = f"{new.ref} vs {live.ref}: {verdict.reason}; the gate waits for more votes."
            return LoopEvent("wait", detail, new.ref)
        self.registry.record_metrics(new.ref, gate_metrics(verdict))
        if verdict.action == PROMOTE:
            self.registry.promote(new.ref, actor=ACTOR, reason=verdict.reason)
            return LoopEvent("promoted", f"{new.ref}: {verdict.reason}; now live.", new.ref)
        self.registry.reject(new.ref, actor=ACTOR, reason=verdict.reason)
        return LoopEvent("rejected", f"{new.ref}: {verdict.reason}; rejected, {live.ref} stays live.", new.ref)

    def _watch(self, snapshot: RegistrySnapshot, live: AdapterVersion) -> LoopEvent | None:
        """Roll the live version back once its head-to-head votes show it worse than its parent."""
        if not live.parent or not snapshot.has(live.name):
            return None
        gate = self.settings.gate or GateSettings()
        verdict = watch_live(self._head_to_head(live.ref, live.parent), gate)
        if verdict.action != ROLLBACK:
            return None
        self.registry.record_metrics(live.ref, gate_metrics(verdict))
        restored = self.registry.rollback(live.name, actor=ACTOR, reason=f"after its promotion, {verdict.reason}")
        return LoopEvent("rolled back", f"{live.ref}: {verdict.reason}; {restored.ref} is live again.", live.ref)

    def _train(
        self, live: AdapterVersion, votes: list[Vote], trainable: list[Vote], set_aside: list[SetAside]
    ) -> tuple[AdapterVersion, dict[str, float]]:
        from loraflow.hub.training import run_training

        timings: dict[str, float] = {}
        started = time.perf_counter()
        first, last = votes[0].seq, votes[-1].seq  # set-aside votes count as learned, so they are not screened again
        data = Path(cache_dir()) / "loop" / f"{live.name}-v{live.version}-votes-{first}-{last}.jsonl"
        report = export_training_data(trainable, data, self.data_format)
        if set_aside:
            lines = [json.dumps({"vote_id": s.vote_id, "seq": s.seq, "reason": s.reason}) for s in set_aside]
            data.with_name(data.stem + ".set_aside.jsonl").write_text("\n".join(lines) + "\n")
        timings["export"] = time.perf_counter() - started
        started = time.perf_counter()
        votes_record = {"first_seq": first, "last_seq": last, "pairs": report.pairs, "set_aside": len(set_aside)}
        if self.data_format != "preference":
            votes_record["examples"] = report.examples
        trained = run_training(
            self.settings.trainer,
            data=data,
            name=live.name,
            base_spec=self.settings.base,
            registry=self.registry,
            config=self.config,
            parent=live.ref,
            provenance={"source": "arena votes", "votes": votes_record},
            promote=False,
            actor=ACTOR,
        )
        timings["train_and_publish"] = time.perf_counter() - started
        return trained, timings

    def run(self, max_steps: int | None = None, on_event=print) -> LoopEvent | None:
        """Step and report; between idle steps sleep `poll_s` (or the back-off). Forever unless `max_steps`."""
        steps, event = 0, None
        while max_steps is None or steps < max_steps:
            event = self.step()
            on_event(event)
            steps += 1
            if event.action in IDLE_ACTIONS and (max_steps is None or steps < max_steps):
                time.sleep(max(self.settings.poll_s, event.retry_in_s))
        return event
