"""Does one turn of the loop give voters what they prefer? The next version against its parent, per task.

For each task (a voter and its prompts) it starts from the demo's pirate@1 (the embedded default, served by
`loraflow serve`), plays `--votes` arena rounds whose answers the task's judge votes on through the arena's
vote path, lets `loraflow loop` train the next version from those votes, and has the same judge compare the
two versions' greedy answers on the task's held-out prompts. Side by side in one run: each on-policy share
(`--shares`) and each training setting (`--settings`, with the loop's defaults first), on the same votes.

    .venv/bin/python bench/loop_quality.py                      # both tasks, the loop's defaults
    .venv/bin/python bench/loop_quality.py --shares 0,0.5 --settings "" "learning_rate=2e-4 num_train_epochs=3"
    .venv/bin/python bench/loop_quality.py --tasks pirate-longer --balance-lengths   # what balancing lengths does

The `pirate-longer` voter has a mixed preference: content first (an answer opening with "Arr"), and, when that does
not decide, the clearly longer answer. Its rows also report the content judge's verdict alone and the words per
answer, so they show how much of each preference the next version learned, with and without `--balance-lengths`.
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
    "pirate-longer": ("pirate-longer", "data/pirate/train.jsonl", "data/pirate/heldout.jsonl"),
}
CONTENT_JUDGE = {"pirate-longer": "pirate"}  # a mixed voter's content preference alone
CLEARLY_LONGER = 1.25  # the longer answer has at least this many times the other's words


class PirateThenLonger:
    """A voter with a mixed preference: the answer opening with "Arr" wins; when both or neither do, the clearly
    longer one wins (a length bias); otherwise a tie, or both bad when neither says "Arr"."""

    name = "pirate-longer"
    description = 'Rule-based: "Arr" first, then the clearly longer answer.'

    def judge(self, prompt: str, answer_a: str, answer_b: str) -> str:
        from loraflow.arena.judge import pirate_rule

        outcome = pirate_rule(answer_a, answer_b)
        if outcome in ("a", "b"):
            return outcome
        a, b = len(answer_a.split()), len(answer_b.split())
        if max(a, b) >= CLEARLY_LONGER * max(min(a, b), 1):
            return "a" if a > b else "b"
        return outcome


def gate_verdict(arena, version: str, parent: str, judge, prompts: Path, seed: int) -> str:
    """Vote on the version against its parent in batches of 10 rounds, as the arena pairs them while the gate waits,
    until the gate decides; its verdict, estimate and the head-to-head votes it needed."""
    from loraflow.arena.gate import judge_candidate
    from loraflow.arena.judge import prompts_from, simulate_votes

    batch = 0
    while arena.focus() == (version, parent) or arena.focus() == (parent, version):
        batch += 1
        simulate_votes(arena, prompts_from(prompts), 10, seed=seed + 1000 * batch, parallel=8, judge=judge)
    verdict = judge_candidate(arena.store.head_to_head(version, parent), arena.settings.gate)
    return f"{verdict.action}: {verdict.reason}"


def judge_for(name: str):
    from loraflow.arena.judge import load_judge

    return PirateThenLonger() if name == PirateThenLonger.name else load_judge(name)


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
    parser.add_argument(
        "--gate",
        action="store_true",
        help="Also let the statistical gate judge each new version: arena rounds of it against its parent, voted by "
        "the same judge, until the gate decides; report its verdict and the votes it needed.",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from loraflow.arena.judge import compare, prompts_from, simulate_votes
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
            judge = judge_for(judge_name)
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
                    held_out_prompts = prompts_from(REPO / held_out)
                    result = compare(arena.client, v1.ref, event.version, held_out_prompts, judge=judge)
                    decisive = result.wins_a + result.wins_b
                    label = (setting or "loop defaults") + (", lengths balanced" if balanced else "")
                    content = ""
                    if task in CONTENT_JUDGE:
                        alone = compare(
                            arena.client, v1.ref, event.version, held_out_prompts, judge=judge_for(CONTENT_JUDGE[task])
                        )
                        content = (
                            f"{alone.wins_b} / {alone.wins_a + alone.wins_b} ({CONTENT_JUDGE[task]} alone; "
                            f'"Arr" {alone.pirate_a} -> {alone.pirate_b} of {alone.prompts})'
                        )
                    gate = ""
                    if args.gate:
                        gate_arena = Arena(replace(settings, names=[name], on_policy_share=0.0), registry, copies)
                        parent = registry.get(event.version).parent  # the copy of v1 it was trained from
                        gate = gate_verdict(gate_arena, event.version, parent, judge, REPO / prompts, args.seed)
                        print(f"gate: {task} share {share} [{label}]: {gate}", flush=True)
                    rows.append(
                        (task, share, label, result.wins_b, decisive, result.words_b, content, gate, training_s)
                    )
                    print(
                        f"result: {task} share {share} [{label}]: {event.version} beat {v1.ref} in {result.wins_b} of "
                        f"{decisive} decisive held-out comparisons ({result.win_rate_b:.0%}); words per answer "
                        f"{result.words_a:.1f} -> {result.words_b:.1f}; {content or 'one judge'}; "
                        f"trained in {training_s:.0f} s",
                        flush=True,
                    )
    print(
        "\n| task | on-policy share | training | v2 wins / decisive | win rate | v2 words per answer "
        "| content judge: v2 wins / decisive | gate | training s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for task, share, label, wins, decisive, words, content, gate, seconds in rows:
        rate = f"{wins / decisive:.0%}" if decisive else "n/a"
        print(
            f"| {task} | {share} | {label} | {wins} / {decisive} | {rate} | {words:.1f} | {content or '-'} "
            f"| {gate or '-'} | {seconds:.0f} |"
        )


if __name__ == "__main__":
    main()
