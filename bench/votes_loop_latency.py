"""Loop latency: from the N-th vote to the first answer served by the new version, split by stage.

Publishes a pirate v1 (a few lora steps on data/pirate; a name's first version is live), starts `loraflow serve`,
records N votes for pirate@1 against the base through the arena's vote path (the answers are the
pirate preference pairs, so no generation time is counted before the N-th vote), then times one
loop step (export, DPO training + publish as a candidate, promotion) and the first answer the server gives for
`pirate`, which now means the promoted version.

    .venv/bin/python bench/votes_loop_latency.py --votes 200
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--votes", type=int, default=200)
    parser.add_argument("--set", action="append", default=[], help="DPO setting KEY=VALUE (default: the loop's).")
    args = parser.parse_args()

    from loraflow.arena.loop import FeedbackLoop, LoopSettings
    from loraflow.arena.matchmaking import Pairing
    from loraflow.arena.rounds import Arena, ArenaSettings, Round
    from loraflow.arena.votes import VoteStore
    from loraflow.hub.base import DEFAULT_BASE
    from loraflow.hub.registry import Registry
    from loraflow.serve.launcher import start_server

    sys.path.insert(0, str(REPO))  # the v1 recipe is shared with the end-to-end test
    from tests.arena.arena_support import greedy_answer, publish_pirate_v1

    folder = Path(tempfile.mkdtemp(prefix="loop-bench-"))
    registry = Registry(folder / "registry.json")
    publish_pirate_v1(registry)
    store = VoteStore(str(folder / "votes.db"), rate_limit=None)
    pairs = [json.loads(line) for line in (REPO / "data/pirate/prefs.jsonl").read_text().splitlines()][: args.votes]
    overrides = {"eval_split": 0.0}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    with start_server(registry.path, DEFAULT_BASE, max_model_len=512) as server:
        server.wait_ready()
        settings = ArenaSettings(names=["pirate"], server_url=server.root_url, base_model=server.base_name)
        arena = Arena(settings, registry, store)
        for number, pair in enumerate(pairs):
            answers = (pair["chosen"], pair["rejected"])
            played = Round(f"bench-{number}", pair["prompt"], Pairing("pirate@1", "base"), answers)
            arena.vote(played, "a", f"bench-{number}")
        started = time.perf_counter()
        # No gate: this measures the path from the N-th vote to an answer from the new version.
        loop_settings = LoopSettings("pirate", votes_needed=len(pairs), gate=None, training_overrides=overrides)
        event = FeedbackLoop(loop_settings, registry, store).step()
        swap_started = time.perf_counter()
        answer = greedy_answer(arena.client, "pirate", "What is 12 plus 30?")
        stages = {**event.timings_s, "first_answer": time.perf_counter() - swap_started}
        total = time.perf_counter() - started
    print(f"{event.action}: {event.detail}")
    print(f"first answer from {registry.live('pirate').ref}: {answer!r}")
    for stage, seconds in stages.items():
        print(f"  {stage:<18} {seconds:7.1f} s  {seconds / total:5.1%}")
    print(f"result: N-th vote to first new answer {total:.1f} s for {len(pairs)} votes")


if __name__ == "__main__":
    main()
