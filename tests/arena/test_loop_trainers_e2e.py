"""The loop with kto and with ppo on the real SmolLM2-135M, on the concise task: votes through the arena path,
a v2 that continues v1, promoted without a gate and served by name. A few steps each, so no quality gain is
asserted; the held-out comparison is printed for information."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from loraflow.arena.judge import compare, load_judge, prompts_from, simulate_votes
from loraflow.arena.loop import FeedbackLoop, LoopSettings
from loraflow.arena.rounds import Arena, ArenaSettings
from loraflow.arena.votes import DECISIVE, OUTCOMES, VoteStore
from loraflow.hub.base import BaseModel
from loraflow.hub.registry import AdapterVersion, Registry
from tests.arena.arena_support import greedy_answer, publish_pirate_v1
from tests.conftest import REPO

CONCISE = REPO / "data" / "concise"
ROUNDS = 40
VOTES_NEEDED = 8
TRAINING = {  # a couple of steps each: this checks the loop end to end, not what the steps teach
    "kto": {"max_steps": 2, "per_device_train_batch_size": 4, "eval_split": 0.0},
    "ppo": {
        "reward_max_steps": 2,
        "total_episodes": 4,
        "per_device_train_batch_size": 2,
        "num_ppo_epochs": 1,
        "response_length": 8,
        "eval_split": 0.0,
    },
}


@dataclass
class Voted:
    """pirate@1 and the concise judge's votes on it, with the server that answered them still running."""

    registry: Registry
    store: VoteStore
    arena: Arena
    v1: AdapterVersion
    base: BaseModel
    folder: Path


@pytest.fixture(scope="module")
def voted(smollm2, tmp_path_factory):
    from loraflow.serve.launcher import start_server

    folder = tmp_path_factory.mktemp("loop-trainers")
    registry = Registry(folder / "registry.json")
    v1 = publish_pirate_v1(registry, max_steps=8)  # enough for short answers, which the concise judge prefers
    store = VoteStore(str(folder / "votes.db"), rate_limit=None)
    with start_server(registry.path, smollm2, max_model_len=512) as server:
        server.wait_ready()
        settings = ArenaSettings(
            names=["pirate"], server_url=server.root_url, base_model=server.base_name, max_tokens=32, temperature=0.7
        )
        arena = Arena(settings, registry, store)
        started = time.perf_counter()
        report = simulate_votes(
            arena, prompts_from(CONCISE / "prompts.jsonl"), rounds=ROUNDS, parallel=8, judge=load_judge("concise")
        )
        print(f"\nconcise votes: {report.outcomes} in {time.perf_counter() - started:.0f} s")
        assert report.created == ROUNDS
        yield Voted(registry, store, arena, v1, smollm2, folder)


def copy_of_v1(voted: Voted, name: str) -> tuple[AdapterVersion, VoteStore]:
    """v1's adapter published again as NAME@1, and the votes copied into a new store with v1's answers NAME@1's."""
    copy = voted.registry.publish(voted.registry.folder(voted.v1), name, base=voted.base)
    copies = VoteStore(str(voted.folder / f"votes-{name}.db"), rate_limit=None)
    for vote in voted.store.votes():
        a, b = (copy.ref if c == voted.v1.ref else c for c in (vote.contestant_a, vote.contestant_b))
        copies.record(replace(vote, contestant_a=a, contestant_b=b))
    return copy, copies


@pytest.mark.e2e
@pytest.mark.parametrize("trainer", ["kto", "ppo"])
def test_the_loop_trains_a_served_v2_with(trainer, voted):
    registry, client = voted.registry, voted.arena.client
    name = f"concise-{trainer}"
    v1, store = copy_of_v1(voted, name)
    learns_from = DECISIVE if trainer == "ppo" else OUTCOMES
    votes = [vote for vote in store.votes(contestants=[v1.ref]) if vote.outcome in learns_from]
    assert len(votes) >= VOTES_NEEDED, f"too few votes on v1 for {trainer}: {[v.outcome for v in votes]}"

    settings = LoopSettings(
        name, trainer=trainer, votes_needed=VOTES_NEEDED, gate=None, training_overrides=TRAINING[trainer]
    )
    event = FeedbackLoop(settings, registry, store).step()
    assert event.action == "promoted", event.detail
    v2 = registry.live(name)
    assert v2.version == 2 and v2.parent == v1.ref and v2.trainer["name"] == trainer
    learned = v2.provenance["votes"]
    assert learned["last_seq"] == votes[-1].seq and learned["first_seq"] == votes[0].seq
    trained_on = len(votes) - learned["set_aside"]
    if trainer == "kto":
        assert learned["examples"] == 2 * trained_on, "every vote gives one example per answer"
        assert learned["pairs"] < trained_on, "ties and both-bad votes are learned from too"
    else:
        assert learned["pairs"] == trained_on
        reward = registry.get(v2.metrics["reward_model"])
        assert reward.name == f"{name}-reward" and reward.kind == "reward"

    prompts = prompts_from(CONCISE / "heldout.jsonl")[:8]
    assert greedy_answer(client, v2.ref, prompts[0]).strip(), f"{v2.ref} is served by name"
    held_out = compare(client, v1.ref, v2.ref, prompts, max_tokens=48, judge=load_judge("concise"))
    print(
        f"{trainer}: {event.timings_s}; held-out concise ({held_out.prompts} prompts): "
        f"v2 shorter {held_out.wins_b}, v1 shorter {held_out.wins_a}"
    )
