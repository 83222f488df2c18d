"""The closed loop on the real SmolLM2-135M: simulated votes through the arena path, DPO, swap, and a better v2."""

from __future__ import annotations

import random
import time

import pytest

from serve.judge import is_pirate, judge, simulate_votes
from serve.loop import FeedbackLoop, LoopSettings, learned_up_to
from serve.rounds import Arena, ArenaSettings
from serve.votes import RateLimit, VoteStore
from tests.conftest import PIRATE
from tests.serve.arena_support import greedy_answer, publish_pirate_v1, user_prompts

ROUNDS = 100


@pytest.mark.e2e
def test_votes_train_v2_which_goes_live_and_beats_v1(registry, tmp_path, smollm2):
    from serve.launcher import start_server

    v1 = publish_pirate_v1(registry)
    store = VoteStore(str(tmp_path / "votes.db"), rate_limit=RateLimit(votes=10, window_s=60))
    with start_server(registry.path, smollm2, alias="live", max_model_len=512) as server:
        server.wait_ready()
        arena = Arena(
            ArenaSettings(names=["pirate"], server_url=server.root_url, base_model=server.base_name, max_tokens=24, temperature=0.7),
            registry,
            store,
        )
        report = simulate_votes(arena, user_prompts(PIRATE / "train.jsonl"), rounds=ROUNDS, parallel=8)
        assert report.created == ROUNDS and store.count() == ROUNDS
        decisive = report.outcomes.get("a", 0) + report.outcomes.get("b", 0)
        print(f"\nsimulated votes: {report.outcomes}")
        assert decisive >= 10, f"v1 and the base gave too few decisive votes to learn from: {report.outcomes}"

        loop = FeedbackLoop(
            LoopSettings(
                "pirate",
                votes_needed=10,
                training_overrides={"max_steps": 20, "learning_rate": 2e-4, "eval_split": 0.0, "per_device_train_batch_size": 4},
            ),
            registry,
            store,
        )
        started = time.perf_counter()
        event = loop.step()
        assert event.action == "promoted", event.detail
        v2 = registry.get("pirate@live")
        assert v2.version == 2 and v2.parent == v1.ref
        assert v2.provenance["votes"]["last_seq"] == learned_up_to(registry, v1) > 0
        assert [v.ref for v in registry.lineage("pirate@latest")] == ["pirate@1", "pirate@2"]

        prompts = user_prompts(PIRATE / "heldout.jsonl")
        swap_started = time.perf_counter()
        served = greedy_answer(arena.client, "pirate", prompts[0])
        swap_s = time.perf_counter() - swap_started
        print(f"loop stages: {event.timings_s}; first answer as the new live version {swap_s:.1f}s; "
              f"N-th vote to first new answer {time.perf_counter() - started:.1f}s")
        assert served == greedy_answer(arena.client, "pirate@2", prompts[0])

        assert arena.focus() == ("pirate@2", "pirate@1")
        first = arena.new_round("Say hello.", random.Random(0))
        assert {first.pairing.a, first.pairing.b} == {"pirate@1", "pirate@2"}

        results = {"a": 0, "b": 0, "tie": 0, "both_bad": 0}
        pirate_rate = {"pirate@1": 0, "pirate@2": 0}
        for prompt in prompts:
            new, old = greedy_answer(arena.client, "pirate@2", prompt), greedy_answer(arena.client, "pirate@1", prompt)
            results[judge(new, old)] += 1
            pirate_rate["pirate@2"] += is_pirate(new)
            pirate_rate["pirate@1"] += is_pirate(old)
    wins, losses = results["a"], results["b"]
    win_rate = wins / max(wins + losses, 1)
    print(f"held-out ({len(prompts)} prompts): v2 wins {wins}, v1 wins {losses}, ties {results['tie']}, both bad {results['both_bad']}; "
          f"win rate {win_rate:.0%}; opening with Arr: {pirate_rate}")
    assert wins + losses >= 5, f"too few decisive held-out comparisons to judge: {results}"
    assert win_rate >= 0.6
