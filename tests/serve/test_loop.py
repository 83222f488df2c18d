"""The feedback loop's decisions on the tiny model: wait, train with DPO, promote, gate, one at a time, resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
from filelock import FileLock

from serve.loop import FeedbackLoop, LoopSettings
from serve.votes import Vote, VoteStore
from tests.conftest import REPO, make_adapter

TRAINING = {"max_steps": 2, "eval_split": 0.0, "per_device_train_batch_size": 2, "max_length": 64}


def pirate_vote(store: VoteStore, winner: str, loser: str, number: int, winner_side: str = "a") -> None:
    prompt = f"What is {number} plus {number}?"
    good, bad = f"Arr! {number} plus {number} be {2 * number}, matey.", f"{number} plus {number} is {2 * number}."
    if winner_side == "a":
        vote = Vote(uuid.uuid4().hex, "tester", prompt, good, bad, winner, loser, "a")
    else:
        vote = Vote(uuid.uuid4().hex, "tester", prompt, bad, good, loser, winner, "b")
    store.record(vote)


@pytest.fixture
def setup(tiny_base, registry, tmp_path):
    adapter = make_adapter(tiny_base, tmp_path / "v1")
    registry.publish(adapter, "pirate", base=tiny_base, trainer={"name": "external"})
    store = VoteStore(str(tmp_path / "votes.db"), rate_limit=None)
    return tiny_base, registry, store


def loop_for(setup, **settings) -> FeedbackLoop:
    base, registry, store = setup
    return FeedbackLoop(LoopSettings("pirate", base=str(base.path), training_overrides=TRAINING, **settings), registry, store)


def test_waits_for_n_decisive_votes_then_trains_promotes_and_records_provenance(setup):
    _, registry, store = setup
    loop = loop_for(setup, votes_needed=4)
    for number in range(3):
        pirate_vote(store, "pirate@1", "base", number, "ab"[number % 2])
    store.record(Vote("tie-1", "tester", "p", "x", "y", "pirate@1", "base", "tie"))
    waiting = loop.step()
    assert waiting.action == "wait" and "3/4" in waiting.detail
    assert registry.aliases("pirate")["live"] == 1

    pirate_vote(store, "pirate@1", "base", 7)
    event = loop.step()
    assert event.action == "promoted", event.detail
    v2 = registry.get("pirate@live")
    assert (v2.version, v2.parent, v2.trainer["name"]) == (2, "pirate@1", "dpo")
    assert v2.provenance["votes"] == {"first_seq": 1, "last_seq": 5, "pairs": 4}
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


def test_gate_promotes_a_winner_and_rejects_a_loser(setup):
    _, registry, store = setup
    loop = loop_for(setup, votes_needed=2, min_win_rate=0.6, gate_votes=4)
    for number in range(2):
        pirate_vote(store, "pirate@1", "base", number)
    assert loop.step().action == "trained"
    assert registry.aliases("pirate")["live"] == 1 and registry.aliases("pirate")["latest"] == 2
    assert loop.step().action == "wait"
    for number, (winner, loser) in enumerate([("pirate@2", "pirate@1")] * 3 + [("pirate@1", "pirate@2")]):
        pirate_vote(store, winner, loser, number, "ab"[number % 2])
    promoted = loop.step()
    assert promoted.action == "promoted" and "75%" in promoted.detail
    assert registry.aliases("pirate")["live"] == 2
    assert registry.get("pirate@2").metrics["arena_win_rate_vs_parent"] == 0.75

    for number in range(2):
        pirate_vote(store, "pirate@2", "base", number)
    assert loop.step().action == "trained"
    for number in range(4):
        pirate_vote(store, "pirate@2", "pirate@3", number)
    rejected = loop.step()
    assert rejected.action == "rejected"
    assert registry.aliases("pirate")["live"] == 2
    assert registry.get("pirate@3").metrics["gate"] == "rejected"


def test_a_loop_killed_mid_training_leaves_everything_intact_and_the_next_run_resumes(setup, tmp_path):
    base, registry, store = setup
    for number in range(3):
        pirate_vote(store, "pirate@1", "base", number)
    cache = tmp_path / "cache"
    command = [
        sys.executable, "-m", "hub.cli", "--registry", str(registry.path), "loop", "pirate", "--once",
        "--votes", store.url, "--votes-needed", "3", "--base", str(base.path),
        "--set", "max_steps=100000", "--set", "eval_split=0", "--set", "max_length=64",
    ]
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "LORAFLOW_CACHE": str(cache)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(cache.glob("runs/pirate-*")) and not list(cache.glob("loop/*.jsonl")):
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "the loop never started training"
        time.sleep(0.1)  # poll interval
    os.kill(process.pid, signal.SIGKILL)
    process.wait(30)
    process.stderr.close()
    assert [v.version for v in registry.versions("pirate")] == [1]
    assert registry.aliases("pirate")["live"] == 1
    assert store.count() == 3

    event = loop_for(setup, votes_needed=3).step()
    assert event.action == "promoted"
    assert registry.get("pirate@live").provenance["votes"]["last_seq"] == 3
