"""The feedback loop on the tiny model: wait, train with DPO, promote or reject through the registry lifecycle,
one at a time, resume after a kill, survive a failed training, set aside votes it cannot learn from."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
from filelock import FileLock

from loraflow.arena.loop import FeedbackLoop, LoopSettings
from loraflow.arena.rounds import Arena, ArenaSettings
from loraflow.arena.settings import GateSettings, HygieneSettings
from loraflow.arena.votes import Vote, VoteStore
from loraflow.hub.base import cache_dir
from loraflow.hub.errors import LoraflowError
from tests.conftest import REPO, make_adapter

TRAINING = {"max_steps": 2, "eval_split": 0.0, "per_device_train_batch_size": 2, "max_length": 64}


def pirate_vote(
    store: VoteStore, winner: str, loser: str, number: int, winner_side: str = "a", good: str | None = None
) -> None:
    prompt = f"What is {number} plus {number}?"
    good = good if good is not None else f"Arr! {number} plus {number} be {2 * number}, matey."
    bad = f"{number} plus {number} is {2 * number}."
    if winner_side == "a":
        vote = Vote(uuid.uuid4().hex, "tester", prompt, good, bad, winner, loser, "a")
    else:
        vote = Vote(uuid.uuid4().hex, "tester", prompt, bad, good, loser, winner, "b")
    store.record(vote)


@pytest.fixture
def setup(tiny_base, registry, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFLOW_CACHE", str(tmp_path / "cache"))
    adapter = make_adapter(tiny_base, tmp_path / "v1")
    registry.publish(adapter, "pirate", base=tiny_base, trainer={"name": "external"})
    store = VoteStore(str(tmp_path / "votes.db"), rate_limit=None)
    return tiny_base, registry, store


def loop_for(setup, **settings) -> FeedbackLoop:
    """A loop on the tiny model; without a gate or vote hygiene unless given, so a trained version goes live at once
    and the tests' votes, cast a few milliseconds apart, all count."""
    base, registry, store = setup
    settings.setdefault("gate", None)
    settings.setdefault("hygiene", None)
    settings = LoopSettings("pirate", base=str(base.path), training_overrides=TRAINING, **settings)
    return FeedbackLoop(settings, registry, store)


def states(registry) -> dict[int, str]:
    return {v.version: v.state for v in registry.versions("pirate")}


def test_waits_for_n_decisive_votes_then_trains_promotes_and_records_provenance(setup):
    _, registry, store = setup
    loop = loop_for(setup, votes_needed=4)
    for number in range(3):
        pirate_vote(store, "pirate@1", "base", number, "ab"[number % 2])
    store.record(Vote("tie-1", "tester", "p", "x", "y", "pirate@1", "base", "tie"))
    waiting = loop.step()
    assert waiting.action == "wait" and "3/4" in waiting.detail
    assert states(registry) == {1: "live"}

    pirate_vote(store, "pirate@1", "base", 7)
    event = loop.step()
    assert event.action == "promoted", event.detail
    v2 = registry.live("pirate")
    assert (v2.version, v2.parent, v2.trainer["name"]) == (2, "pirate@1", "dpo")
    assert states(registry) == {1: "retired", 2: "live"}
    assert v2.provenance["votes"] == {"first_seq": 1, "last_seq": 5, "pairs": 4, "set_aside": 0}
    promotion = registry.history("pirate")[-1]
    assert (promotion.action, promotion.actor, promotion.version) == ("promote", "loop", 2)
    assert set(event.timings_s) >= {"export", "train_and_publish", "promote"}
    assert loop.step().action == "wait"  # v2 has no votes yet; v1's votes are not learned twice
    assert store.count() == 5


def test_only_one_retrain_at_a_time(setup):
    _, registry, store = setup
    loop = loop_for(setup, votes_needed=1)
    pirate_vote(store, "pirate@1", "base", 1)
    with FileLock(str(registry.path) + ".loop-pirate.lock"):
        assert loop.step().action == "busy"
    assert [v.version for v in registry.versions("pirate")] == [1]


GATE = GateSettings(min_votes=4, max_votes=12)


def test_gate_promotes_a_winner_and_rejects_a_loser_which_leaves_the_arena(setup):
    _, registry, store = setup
    loop = loop_for(setup, votes_needed=2, gate=GATE)
    for number in range(2):
        pirate_vote(store, "pirate@1", "base", number)
    assert loop.step().action == "trained"
    assert states(registry) == {1: "live", 2: "candidate"}
    for number, (winner, loser) in enumerate([("pirate@2", "pirate@1")] * 3 + [("pirate@1", "pirate@2")]):
        pirate_vote(store, winner, loser, number, "ab"[number % 2])
    written = registry.path.read_bytes()
    undecided = loop.step()  # 3 of 4: the interval still reaches below 0.5
    assert undecided.action == "wait" and "from 4 head-to-head votes" in undecided.detail, undecided.detail
    assert registry.path.read_bytes() == written  # a waiting step writes nothing
    for number in range(6):
        pirate_vote(store, "pirate@2", "pirate@1", 10 + number, "ab"[number % 2])
    promoted = loop.step()  # 9 of 10
    assert promoted.action == "promoted", promoted.detail
    assert states(registry) == {1: "retired", 2: "live"}
    metrics = registry.get("pirate@2").metrics
    assert metrics["arena_win_probability_low"] > 0.5 and metrics["arena_gate_votes"] == 10
    assert registry.history("pirate")[-1].reason.startswith("P(pirate@2 beats pirate@1)")

    for number in range(2):
        pirate_vote(store, "pirate@2", "base", number)
    assert loop.step().action == "trained"
    for number in range(10):
        pirate_vote(store, "pirate@2", "pirate@3", number)
    rejected = loop.step()  # lost 10 of 10: the upper bound is below 0.5
    assert rejected.action == "rejected", rejected.detail
    assert states(registry) == {1: "retired", 2: "live", 3: "rejected"}
    verdict = registry.history("pirate")[-1]
    assert (verdict.action, verdict.actor, verdict.version) == ("reject", "loop", 3)
    arena = Arena(ArenaSettings(names=["pirate"], server_url="http://127.0.0.1:9", base_model="tiny"), registry, store)
    assert "pirate@3" not in arena.contestants() and arena.focus() is None


def test_gate_rejects_a_candidate_not_shown_better_within_its_vote_budget(setup):
    _, registry, store = setup
    loop = loop_for(setup, votes_needed=2, gate=GATE)
    for number in range(2):
        pirate_vote(store, "pirate@1", "base", number)
    assert loop.step().action == "trained"
    for number in range(11):
        pirate_vote(store, *(("pirate@2", "pirate@1") if number % 2 else ("pirate@1", "pirate@2")), number)
    assert loop.step().action == "wait"  # 11 votes, 5 won: undecided within the budget of 12
    pirate_vote(store, "pirate@2", "pirate@1", 11)
    rejected = loop.step()
    assert rejected.action == "rejected" and "from 12 head-to-head votes" in rejected.detail
    assert states(registry) == {1: "live", 2: "rejected"}


def test_a_live_version_shown_worse_than_its_parent_is_rolled_back(setup):
    _, registry, store = setup
    loop = loop_for(setup, votes_needed=2)  # no gate: promoted right after training, then watched
    for number in range(2):
        pirate_vote(store, "pirate@1", "base", number)
    assert loop.step().action == "promoted"
    arena = Arena(ArenaSettings(names=["pirate"], server_url="http://127.0.0.1:9", base_model="tiny"), registry, store)
    assert arena.focus() == ("pirate@2", "pirate@1")  # the watch asks the arena for their votes
    loop.settings.votes_needed = 100  # no retrain from these votes: this test watches
    for number in range(4):
        pirate_vote(store, "pirate@1", "pirate@2", number, "ab"[number % 2])
    assert loop.step().action == "wait"  # 4 votes: too few to tell (the default gate's minimum is 10)
    for number in range(6):
        pirate_vote(store, "pirate@1", "pirate@2", 10 + number)
    rolled_back = loop.step()
    assert rolled_back.action == "rolled back", rolled_back.detail
    assert states(registry) == {1: "live", 2: "rejected"}
    event = registry.history("pirate")[-1]
    assert (event.action, event.actor, event.version) == ("rollback", "loop", 1)
    assert "P(pirate@2 beats pirate@1)" in event.reason
    assert registry.get("pirate@2").metrics["arena_win_probability_high"] < 0.5
    assert arena.focus() is None and "pirate@2" not in arena.contestants()


def test_a_loop_killed_mid_training_leaves_everything_intact_and_the_next_run_resumes(setup, tmp_path):
    base, registry, store = setup
    for number in range(3):
        pirate_vote(store, "pirate@1", "base", number)
    cache = tmp_path / "cache"
    command = [
        sys.executable,
        "-m",
        "loraflow.hub.cli",
        "--registry",
        str(registry.path),
        "loop",
        "pirate",
        "--once",
        "--votes",
        store.url,
        "--votes-needed",
        "3",
        "--base",
        str(base.path),
        "--no-hygiene",  # the test's votes are cast milliseconds apart
        "--set",
        "max_steps=100000",
        "--set",
        "eval_split=0",
        "--set",
        "max_length=64",
    ]
    environment = {**os.environ, "LORAFLOW_CACHE": str(cache)}
    process = subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(cache.glob("runs/pirate-*")) and not list(cache.glob("loop/*.jsonl")):
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "the loop never started training"
        time.sleep(0.1)  # poll interval
    os.kill(process.pid, signal.SIGKILL)
    process.wait(30)
    process.stderr.close()
    assert states(registry) == {1: "live"}
    assert store.count() == 3

    event = loop_for(setup, votes_needed=3).step()
    assert event.action == "promoted"
    assert registry.live("pirate").provenance["votes"]["last_seq"] == 3


def test_a_training_that_raises_is_recorded_backed_off_and_retried_while_the_loop_runs_on(setup, monkeypatch):
    from loraflow.hub import training

    _, registry, store = setup
    real_training, calls = training.run_training, []

    def fails_once(*args, **kwargs):
        calls.append(kwargs)
        if len(calls) == 1:
            raise RuntimeError("out of memory while training\nsecond line of the message")
        return real_training(*args, **kwargs)

    monkeypatch.setattr(training, "run_training", fails_once)
    for number in range(2):
        pirate_vote(store, "pirate@1", "base", number)
    events = []
    loop_for(setup, votes_needed=2, poll_s=0, backoff_s=0).run(max_steps=2, on_event=events.append)
    assert [e.action for e in events] == ["train-failed", "promoted"], [e.detail for e in events]
    assert "out of memory" in events[0].detail
    failed = [e for e in registry.history("pirate") if e.action == "train-failed"]
    assert len(failed) == 1 and failed[0].actor == "loop"
    assert failed[0].reason == "RuntimeError: out of memory while training"
    assert calls[0]["promote"] is False and calls[0]["actor"] == "loop"
    assert states(registry) == {1: "retired", 2: "live"}


def test_after_a_failed_training_the_loop_backs_off_without_writing(setup, monkeypatch):
    from loraflow.hub import training

    _, registry, store = setup
    monkeypatch.setattr(training, "run_training", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    pirate_vote(store, "pirate@1", "base", 1)
    loop = loop_for(setup, votes_needed=1, backoff_s=600, max_backoff_s=900)
    failed = loop.step()
    assert failed.action == "train-failed" and failed.retry_in_s == 600
    written = registry.path.read_bytes()
    backing_off = loop.step()
    assert backing_off.action == "backoff" and 590 < backing_off.retry_in_s <= 600
    assert registry.path.read_bytes() == written
    assert loop.backoff_after(2) == 900  # doubled, then capped


def test_votes_it_cannot_learn_from_are_set_aside_and_counted_while_the_rest_train(setup):
    _, registry, store = setup
    for number in range(3):
        pirate_vote(store, "pirate@1", "base", number)
    pirate_vote(store, "pirate@1", "base", 3, good="Arr! " + "yo ho ho and a bottle of rum " * 20)  # over max_length 64
    store.record(Vote("empty-answer", "tester", "Say hi.", "Arr, hi!", "", "pirate@1", "base", "a"))
    event = loop_for(setup, votes_needed=3).step()
    assert event.action == "promoted", event.detail
    assert event.set_aside == 2 and "2 set aside" in event.detail
    assert registry.live("pirate").provenance["votes"] == {"first_seq": 1, "last_seq": 5, "pairs": 3, "set_aside": 2}
    side_file = next((cache_dir() / "loop").glob("*.set_aside.jsonl"))
    aside = [json.loads(line) for line in side_file.read_text().splitlines()]
    assert [record["seq"] for record in aside] == [4, 5]
    assert "over max_length 64" in aside[0]["reason"] and "non-empty" in aside[1]["reason"]


def test_with_kto_the_loop_learns_from_ties_and_both_bad_votes_too(setup):
    _, registry, store = setup
    pirate_vote(store, "pirate@1", "base", 1)
    store.record(Vote("tie-1", "tester", "Say hi.", "Arr, hi!", "Ahoy!", "pirate@1", "base", "tie"))
    store.record(Vote("bad-1", "tester", "Say bye.", "Bye.", "Goodbye.", "base", "pirate@1", "both_bad"))
    waiting = loop_for(setup, trainer="kto", votes_needed=4).step()
    assert waiting.action == "wait" and "3/4 new votes" in waiting.detail  # every outcome counts for kto
    event = loop_for(setup, trainer="kto", votes_needed=3).step()
    assert event.action == "promoted", event.detail
    v2 = registry.live("pirate")
    assert (v2.parent, v2.trainer["name"]) == ("pirate@1", "kto")
    assert v2.provenance["votes"] == {"first_seq": 1, "last_seq": 3, "pairs": 1, "set_aside": 0, "examples": 6}


def test_a_trainer_that_cannot_read_votes_is_refused_at_start(setup):
    with pytest.raises(LoraflowError, match="the lora trainer reads messages data"):
        loop_for(setup, trainer="lora")


def test_votes_vote_hygiene_excludes_are_set_aside_with_their_reason(setup):
    _, registry, store = setup
    for number in range(3):  # cast milliseconds apart by one session: all but the first are rapid-fire
        pirate_vote(store, "pirate@1", "base", number)
    waiting = loop_for(setup, votes_needed=3, hygiene=HygieneSettings()).step()
    assert waiting.action == "wait" and "1/3 new decisive votes to train on; 2 set aside" in waiting.detail
    event = loop_for(setup, votes_needed=1, hygiene=HygieneSettings()).step()
    assert event.action == "promoted" and event.set_aside == 2, event.detail
    side_file = next((cache_dir() / "loop").glob("*.set_aside.jsonl"))
    aside = [json.loads(line) for line in side_file.read_text().splitlines()]
    assert [a["seq"] for a in aside] == [2, 3] and all(a["reason"].startswith("rapid-fire") for a in aside)


def test_balance_lengths_sets_aside_the_surplus_of_longer_winners(setup):
    from loraflow.arena.loop import LENGTH_BALANCE

    _, registry, store = setup
    for number in range(3):  # the pirate answer wins, and it is the longer one
        pirate_vote(store, "pirate@1", "base", number)
    pirate_vote(store, "pirate@1", "base", 9, good="Arr, 18!")  # here the winner is the shorter answer
    event = loop_for(setup, votes_needed=2, balance_lengths=True).step()
    assert event.action == "promoted" and event.set_aside == 2, event.detail
    assert registry.live("pirate").provenance["votes"]["pairs"] == 2
    side_file = next((cache_dir() / "loop").glob("*.set_aside.jsonl"))
    assert [json.loads(line)["reason"] for line in side_file.read_text().splitlines()] == [LENGTH_BALANCE] * 2
