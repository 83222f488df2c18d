"""The closed loop on the real SmolLM2-135M: simulated votes through the arena path, DPO, promotion, and a better v2."""

from __future__ import annotations

import random
import time

import pytest

from loraflow.arena.judge import compare, prompts_from, simulate_votes
from loraflow.arena.loop import FeedbackLoop, LoopSettings, learned_up_to
from loraflow.arena.rounds import Arena, ArenaSettings
from loraflow.arena.votes import RateLimit, VoteStore
from tests.arena.arena_support import greedy_answer, publish_pirate_v1
from tests.conftest import PIRATE

ROUNDS = 100


@pytest.mark.e2e
def test_votes_train_v2_which_goes_live_and_beats_v1(registry, tmp_path, smollm2):
    from loraflow.serve.launcher import start_server

    v1 = publish_pirate_v1(registry)
    store = VoteStore(str(tmp_path / "votes.db"), rate_limit=RateLimit(votes=10, window_s=60))
    with start_server(registry.path, smollm2, max_model_len=512) as server:
        server.wait_ready()
        arena = Arena(
            ArenaSettings(
                names=["pirate"],
                server_url=server.root_url,
                base_model=server.base_name,
                max_tokens=24,
                temperature=0.7,
            ),
            registry,
            store,
        )
        report = simulate_votes(arena, prompts_from(PIRATE / "train.jsonl"), rounds=ROUNDS, parallel=8)
        assert report.created == ROUNDS and store.count() == ROUNDS
        decisive = report.outcomes.get("a", 0) + report.outcomes.get("b", 0)
        print(f"\nsimulated votes: {report.outcomes}")
        assert decisive >= 10, f"v1 and the base gave too few decisive votes to learn from: {report.outcomes}"

        loop = FeedbackLoop(
            LoopSettings(
                "pirate",
                votes_needed=10,
                training_overrides={
                    "max_steps": 20,
                    "learning_rate": 2e-4,
                    "eval_split": 0.0,
                    "per_device_train_batch_size": 4,
                },
                gate=None,
            ),
            registry,
            store,
        )
        started = time.perf_counter()
        event = loop.step()
        assert event.action == "promoted", event.detail
        v2 = registry.live("pirate")
        assert v2.version == 2 and v2.parent == v1.ref and registry.get(v1.ref).state == "retired"
        assert v2.provenance["votes"]["last_seq"] == learned_up_to(registry, v1) > 0
        assert [v.ref for v in registry.lineage("pirate@latest")] == ["pirate@1", "pirate@2"]

        prompts = prompts_from(PIRATE / "heldout.jsonl")
        swap_started = time.perf_counter()
        served = greedy_answer(arena.client, "pirate", prompts[0])
        swap_s = time.perf_counter() - swap_started
        print(
            f"loop stages: {event.timings_s}; first answer as the new live version {swap_s:.1f}s; "
            f"N-th vote to first new answer {time.perf_counter() - started:.1f}s"
        )
        assert served == greedy_answer(arena.client, "pirate@2", prompts[0])

        assert arena.focus() == ("pirate@2", "pirate@1")
        arena.settings.on_policy_share = 0
        first = arena.new_round("Say hello.", random.Random(0))
        assert {first.pairing.a, first.pairing.b} == {"pirate@1", "pirate@2"}

        held_out = compare(arena.client, "pirate@1", "pirate@2", prompts)
    print(
        f"held-out ({held_out.prompts} prompts): v2 wins {held_out.wins_b}, v1 wins {held_out.wins_a}; "
        f"win rate {held_out.win_rate_b:.0%}; opening with Arr: v1 {held_out.pirate_a}, v2 {held_out.pirate_b}"
    )
    assert held_out.wins_a + held_out.wins_b >= 5, f"too few decisive held-out comparisons to judge: {held_out}"
    assert held_out.win_rate_b >= 0.6
