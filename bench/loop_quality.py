"""Does one turn of the loop give voters what they prefer? The next version against its parent, per task.

For each task (a voter and its prompts) it starts from the demo's pirate@1 (the embedded default, served by
`loraflow serve`), plays `--votes` arena rounds whose answers the task's judge votes on through the arena's
vote path, lets `loraflow loop` train the next version from those votes, and has the same judge compare the
two versions' greedy answers on the task's held-out prompts. Side by side in one run: each on-policy share
(`--shares`) and each training setting (`--settings`, with the loop's defaults first), on the same votes.

    .venv/bin/python bench/loop_quality.py                      # both tasks, the loop's defaults
    .venv/bin/python bench/loop_quality.py --shares 0,0.5 --settings "" "learning_rate=2e-4 num_train_epochs=3"
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
TASKS = {  # judge, arena prompts, held-out prompts
    "pirate": ("pirate", "data/pirate/train.jsonl", "data/pirate/heldout.jsonl"),
    "concise": ("concise", "data/concise/prompts.jsonl", "data/concise/heldout.jsonl"),
}


def parsed(setting: str) -> dict:
    pairs = (item.partition("=") for item in setting.split())
    return {key: yaml.safe_load(value) for key, _, value in pairs}


def votes_for_copy(registry, v1, name: str, store, path: Path):
    """Publish v1's adapter again as NAME@1 and copy the votes into a new store, v1's answers now NAME@1's."""
    from loraflow.arena.votes import VoteStore
    from loraflow.hub.base import DEFAULT_BASE, resolve_base

    copy = registry.publish(registry.folder(v1), name, base=resolve_base(DEFAULT_BASE))
    copies = VoteStore(str(path), rate_limit=None)
    for vote in store.votes():
        a, b = (copy.ref if c == v1.ref else c for c in (vote.contestant_a, vote.contestant_b))
        copies.record(replace(vote, contestant_a=a, contestant_b=b))
    return copies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help="Comma-separated: " + ", ".join(TASKS))
    parser.add_argument("--votes", type=int, default=120, help="Arena rounds voted on before the loop trains.")
    parser.add_argument("--shares", default=None, help="On-policy shares to compare (default: the arena's).")
    parser.add_argument(
        "--settings", nargs="*", default=[""], help='Trainer settings per run, "KEY=VALUE ..."; "" is the loop\'s.'
    )
    parser.add_argument(
        "--balance-lengths", action="store_true", help="Also train each setting on length-balanced votes, side by side."
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from loraflow.arena.judge import compare, load_judge, prompts_from, simulate_votes
    from loraflow.arena.loop import FeedbackLoop, LoopSettings
    from loraflow.arena.rounds import Arena, ArenaSettings
    from loraflow.arena.votes import VoteStore
    from loraflow.hub.base import DEFAULT_BASE
    from loraflow.hub.cli_common import default_of
    from loraflow.hub.registry import Registry
    from loraflow.serve.launcher import start_server

    sys.path.insert(0, str(REPO))  # the v1 recipe is shared with the end-to-end test
    from tests.arena.arena_support import publish_pirate_v1

    default_share = default_of(ArenaSettings, "on_policy_share")
    shares = [float(s) for s in args.shares.split(",")] if args.shares else [default_share]
    folder = Path(tempfile.mkdtemp(prefix="loop-quality-"))
    registry = Registry(folder / "registry.json")
    v1 = publish_pirate_v1(registry)
    rows = []
    with start_server(registry.path, DEFAULT_BASE, max_model_len=1024) as server:
        server.wait_ready()
        for task in args.tasks.split(","):
            judge_name, prompts, held_out = TASKS[task]
            judge = load_judge(judge_name)
            for share in shares:
                store = VoteStore(str(folder / f"votes-{task}-{share}.db"), rate_limit=None)
                settings = ArenaSettings(
                    names=["pirate"], server_url=server.root_url, base_model=server.base_name, on_policy_share=share
                )
                arena = Arena(settings, registry, store)
                started = time.perf_counter()
                report = simulate_votes(
                    arena, prompts_from(REPO / prompts), args.votes, seed=args.seed, parallel=8, judge=judge
                )
                voting_s = time.perf_counter() - started
                own = sum(v.same_contestant for v in store.votes())
                print(f"{task} share {share}: {report.outcomes}, {own} on-policy, {voting_s:.0f} s", flush=True)
                runs = [(setting, False) for setting in args.settings]
                runs += [(setting, True) for setting in args.settings] if args.balance_lengths else []
                for number, (setting, balanced) in enumerate(runs):
                    # Each setting trains its own copy of v1 (a new name) on the same votes, renamed to that copy.
                    name = f"{task}-{str(share).replace('.', '')}-{number}"
                    copies = votes_for_copy(registry, v1, name, store, folder / f"votes-{name}.db")
                    loop_settings = LoopSettings(
                        name, votes_needed=1, gate=None, balance_lengths=balanced, training_overrides=parsed(setting)
                    )
                    started = time.perf_counter()
                    event = FeedbackLoop(loop_settings, registry, copies).step()
                    training_s = time.perf_counter() - started
                    if event.action != "promoted":  # e.g. balancing lengths left no vote of a pure length preference
                        print(f"result: {task} share {share} [{balanced=}]: no training: {event.detail}")
                        continue
                    result = compare(arena.client, v1.ref, event.version, prompts_from(REPO / held_out), judge=judge)
                    decisive = result.wins_a + result.wins_b
                    label = (setting or "loop defaults") + (", lengths balanced" if balanced else "")
                    rows.append((task, share, label, result.wins_b, decisive, result.words_b, training_s))
                    print(
                        f"result: {task} share {share} [{label}]: {event.version} beat {v1.ref} in {result.wins_b} of "
                        f"{decisive} decisive held-out comparisons ({result.win_rate_b:.0%}); words per answer "
                        f"{result.words_a:.1f} -> {result.words_b:.1f}; "
                        f"trained in {training_s:.0f} s",
                        flush=True,
                    )
    print("\n| task | on-policy share | training | v2 wins / decisive | win rate | v2 words per answer | training s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for task, share, label, wins, decisive, words, seconds in rows:
        rate = f"{wins / decisive:.0%}" if decisive else "n/a"
        print(f"| {task} | {share} | {label} | {wins} / {decisive} | {rate} | {words:.1f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
