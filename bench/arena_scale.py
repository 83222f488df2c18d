"""Arena at scale: a vote click, a new round and an export with 100 votes stored against 100,000, through Gradio.

Each size gets a fresh SQLite vote store, seeded straight into the votes table with votes spread over sessions and
days the way people cast them (so vote hygiene keeps them), over the registry's contestants: the base, pirate@1 and
the live pirate@2 (whose parent is pirate@1, so each round checks whether their head-to-head still needs votes; at
both sizes it has enough to decide, so both play the same mix of pairs).
The arena UI (`build_arena`, queued as `loraflow arena` queues it) runs in this process against a real vLLM server
and is driven only through its Gradio API with `gradio_client`:
- new round: submitting a prompt to /ask until the first streamed update, and `Arena.new_round` alone (the pairing
  that runs before generation starts), timed in process between the clicks;
- vote: the /vote_a or /vote_b click's round trip after a finished round;
- concurrency: --clients sessions each playing rounds (ask, then vote) for --seconds; rounds/s, and every vote
  acknowledged must be stored exactly once under its session (every tenth vote is clicked twice, as a double click);
- export: `export_votes_of` in process and `loraflow votes export` as a command, on each store before its arena starts.
Both sizes run one after the other in one run, on one server, with the same prompts; the ratios compare them. The
load average is printed before and after each size's rounds: other jobs on the machine show in the latencies.

    .venv/bin/python bench/arena_scale.py                              # tiny random base, 100 vs 100,000 votes
    .venv/bin/python bench/arena_scale.py --base smollm2-135m --rounds 100 --seconds 60
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NAME = "pirate"
CONTESTANTS = ("base", f"{NAME}@1", f"{NAME}@2")
STRENGTH = {"base": 0.0, f"{NAME}@1": 0.4, f"{NAME}@2": 0.8}  # the seeded voters' hidden Bradley-Terry strengths
ON_POLICY_SHARE = 0.4  # seeded votes on two samples of the live version, as on-policy rounds cast them
VOTES_PER_SESSION = 100
SEED_DAYS = 30
QUEUE_CONCURRENCY = 8  # what `loraflow arena` queues its events with
DOUBLE_CLICK_EVERY = 10
# The watch on pirate@2 decides after 10 head-to-head votes, which both sizes have (100 stored: about 25): each round
# still counts them, but neither size's rounds are all pirate@2 against pirate@1, so both play the same mix of pairs
# (with the default 10 to 100 votes, 100 stored would pair only the two adapters, 100,000 the base too half the time).
DECIDED_WATCH_VOTES = 10


def load_average() -> str:
    """The machine's 1, 5 and 15 minute load averages: other jobs on it show in the latencies."""
    return " ".join(f"{load:.2f}" for load in os.getloadavg())


def percentile(samples: list[float], share: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(share * len(ordered)) - 1))]


def spread(samples: list[float]) -> str:
    return f"p50 {percentile(samples, 0.5) * 1e3:7.1f} ms  p95 {percentile(samples, 0.95) * 1e3:7.1f} ms"


def answer_texts(rng: random.Random) -> tuple[list[str], list[str]]:
    """Prompts, and answers of a few sentences each (about what --max-tokens 96 gives), from the pirate pairs."""
    pairs = [json.loads(line) for line in (REPO / "data/pirate/prefs.jsonl").read_text().splitlines()]
    sentences = [text for pair in pairs for text in (pair["chosen"], pair["rejected"])]
    answers = [" ".join(rng.sample(sentences, 4)) for _ in range(2000)]
    return [pair["prompt"] for pair in pairs], answers


def seed_votes(store, count: int, prompts: list[str], answers: list[str], rng: random.Random) -> None:
    """`count` votes in one transaction, through the store's own table: sessions of VOTES_PER_SESSION votes each,
    minutes apart over SEED_DAYS days, outcomes drawn from STRENGTH."""
    from sqlalchemy import insert

    from loraflow.arena.votes import VoteRow

    now = time.time()
    sessions = max(1, count // VOTES_PER_SESSION)
    rows = []
    for number in range(count):
        session = number % sessions
        created = now - SEED_DAYS * 86400 + (number // sessions) * (SEED_DAYS * 86400 / VOTES_PER_SESSION)
        created += session * 7.0  # sessions interleave; each one's votes stay hours apart
        if rng.random() < ON_POLICY_SHARE:
            a = b = CONTESTANTS[2]
        else:
            a, b = rng.sample(CONTESTANTS, 2)
        p_a = 1 / (1 + math.exp(STRENGTH[b] - STRENGTH[a]))
        draw = rng.random()
        outcome = "tie" if draw < 0.1 else "both_bad" if draw < 0.15 else "a" if rng.random() < p_a else "b"
        rows.append(
            {
                "vote_id": uuid.UUID(int=rng.getrandbits(128)).hex,
                "created": created,
                "session_id": f"guest:seeded-{session}",
                "prompt": rng.choice(prompts),
                "answer_a": rng.choice(answers),
                "answer_b": rng.choice(answers),
                "contestant_a": a,
                "contestant_b": b,
                "outcome": outcome,
            }
        )
    rows.sort(key=lambda row: row["created"])
    with store.engine.begin() as connection:
        connection.execute(insert(VoteRow.__table__), rows)


def publish_contestants(registry, base, folder: Path) -> None:
    """pirate@1, then pirate@2 from it, promoted: a live version whose parent the gate still watches."""
    sys.path.insert(0, str(REPO))  # the tiny adapter recipe is shared with the tests
    from tests.conftest import make_adapter

    for version in (1, 2):
        adapter = make_adapter(base, folder / f"adapter-{version}", seed=version)
        parent = f"{NAME}@1" if version == 2 else None
        registry.publish(adapter, NAME, base=base, trainer={"name": "external"}, parent=parent, promote=True)


def tiny_base(folder: Path):
    sys.path.insert(0, str(REPO))
    from loraflow.hub.base import resolve_base
    from tests.conftest import write_tiny_llama

    return write_tiny_llama(resolve_base("smollm2-135m"), folder / "tiny-llama")


class Visitor:
    """One browser session: a gradio_client Client, whose session hash keeps this visitor's round on the server."""

    def __init__(self, url: str):
        from gradio_client import Client

        self.client = Client(url, verbose=False)
        self.session_id = f"guest:{self.client.session_hash}"
        self.acknowledged = 0

    def ask(self, prompt: str) -> tuple[float, float]:
        """Seconds to the first streamed update and to the finished round."""
        started = time.perf_counter()
        job = self.client.submit(prompt, api_name="/ask")
        first = None
        for _ in job:
            first = first or time.perf_counter() - started
        job.result()
        return first or time.perf_counter() - started, time.perf_counter() - started

    def reset(self) -> float:
        """The New round button: it touches no votes, so its round trip is Gradio's own share of a click."""
        started = time.perf_counter()
        self.client.predict(api_name="/new_round")
        return time.perf_counter() - started

    def vote(self, endpoint: str = "/vote_a") -> float:
        started = time.perf_counter()
        _, status = self.client.predict(api_name=endpoint)
        seconds = time.perf_counter() - started
        if status.startswith("Vote recorded"):
            self.acknowledged += 1
        elif "already recorded" not in status:
            raise RuntimeError(f"the vote was not recorded: {status!r}")
        return seconds


def sequential(arena, url: str, prompts: list[str], rounds: int) -> dict[str, list[float]]:
    """One visitor's rounds, one after the other, with `Arena.new_round` timed alone between them."""
    visitor = Visitor(url)
    found = {"first_update": [], "round": [], "vote": [], "new_round": [], "reset": []}
    rng = random.Random(1)
    for number in range(rounds):
        prompt = prompts[number % len(prompts)]
        started = time.perf_counter()
        arena.new_round(prompt, rng)
        found["new_round"].append(time.perf_counter() - started)
        first, whole = visitor.ask(prompt)
        found["first_update"].append(first)
        found["round"].append(whole)
        found["vote"].append(visitor.vote("/vote_a" if number % 2 else "/vote_b"))
        found["reset"].append(visitor.reset())
    return found


def concurrent(url: str, prompts: list[str], clients: int, seconds: float) -> tuple[list[Visitor], int, float, list]:
    """`clients` visitors playing rounds until the deadline; returns them, rounds finished, elapsed s, failures."""
    with ThreadPoolExecutor(clients) as pool:
        visitors = list(pool.map(lambda _: Visitor(url), range(clients)))
    rounds, failures, lock = [0], [], threading.Lock()
    barrier = threading.Barrier(clients)
    started = [0.0]

    def play(index: int, visitor: Visitor) -> None:
        barrier.wait()
        if index == 0:
            started[0] = time.perf_counter()
        deadline = time.perf_counter() + seconds
        number = 0
        while time.perf_counter() < deadline:
            try:
                visitor.ask(prompts[(index * 7 + number) % len(prompts)])
                visitor.vote()
                if number % DOUBLE_CLICK_EVERY == 0:
                    visitor.vote()
            except Exception as error:  # counted and reported: a failed round is a finding, not a crash
                with lock:
                    failures.append(repr(error))
            else:
                with lock:
                    rounds[0] += 1
            number += 1

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(play, range(clients), visitors))
    return visitors, rounds[0], time.perf_counter() - started[0], failures


def stored_per_session(store, sessions: list[str]) -> dict[str, int]:
    from sqlalchemy import func, select

    from loraflow.arena.votes import VoteRow

    query = (
        select(VoteRow.session_id, func.count(), func.count(func.distinct(VoteRow.vote_id)))
        .where(VoteRow.session_id.in_(sessions))
        .group_by(VoteRow.session_id)
    )
    with store.engine.connect() as connection:
        return {session: (total, distinct) for session, total, distinct in connection.execute(query)}


def export_seconds(store, folder: Path) -> tuple[float, float, int]:
    """`export_votes_of` in process, then `loraflow votes export` as a command; and the pairs written."""
    from loraflow.arena.export import export_votes_of

    started = time.perf_counter()
    report = export_votes_of(store, NAME, folder / "pairs.jsonl")
    in_process = time.perf_counter() - started
    database = store.url.removeprefix("sqlite:///")
    command = [sys.executable, "-m", "loraflow.hub.cli", "votes", "export", NAME, "--out", str(folder / "cli.jsonl")]
    started = time.perf_counter()
    subprocess.run([*command, "--votes", database], check=True, capture_output=True, cwd=REPO)
    return in_process, time.perf_counter() - started, report.pairs


def measure_size(stored: int, server, registry, prompts, answers, args, folder: Path) -> dict:
    from loraflow.arena.rounds import Arena, ArenaSettings
    from loraflow.arena.settings import ALL, GateSettings
    from loraflow.arena.ui import build_arena
    from loraflow.arena.votes import VoteStore
    from loraflow.serve.launcher import free_port

    folder.mkdir()
    store = VoteStore(str(folder / "votes.db"), rate_limit=None)  # the bench's sessions vote faster than people
    started = time.perf_counter()
    seed_votes(store, stored, prompts, answers, random.Random(stored))
    seeded_s = time.perf_counter() - started
    export_in_process, export_cli, pairs = export_seconds(store, folder)  # before the arena, so nothing else runs
    print(
        f"[{stored} stored] export {store.count()} votes ({pairs} pairs): export_votes_of {export_in_process:.2f} s, "
        f"loraflow votes export {export_cli:.2f} s",
        flush=True,
    )
    settings = ArenaSettings(
        names=[NAME],
        server_url=server.root_url,
        base_model=server.base_name,
        max_tokens=args.max_tokens,
        gate=GateSettings(min_votes=DECIDED_WATCH_VOTES, max_votes=DECIDED_WATCH_VOTES),
    )
    started = time.perf_counter()
    arena = Arena(settings, registry, store)
    port = free_port()
    blocks = build_arena(arena)
    blocks.queue(default_concurrency_limit=QUEUE_CONCURRENCY)
    blocks.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        # The first background fit: the UI serves meanwhile; the bench waits for it, to measure a steady state.
        assert arena.live_leaderboard.refresh()[ALL].votes == stored
        first_fit_s = time.perf_counter() - started
        print(f"[{stored} stored] seeded in {seeded_s:.1f} s, first leaderboard fit {first_fit_s:.1f} s", flush=True)
        print(f"[{stored} stored] load average before the rounds: {load_average()}", flush=True)
        timings = sequential(arena, url, prompts, args.rounds)
        for key, samples in timings.items():
            print(f"[{stored} stored] {key:<13} {spread(samples)}", flush=True)
        before = store.count()
        visitors, rounds, elapsed, failures = concurrent(url, prompts, args.clients, args.seconds)
        found = stored_per_session(store, [visitor.session_id for visitor in visitors])
        acknowledged = sum(visitor.acknowledged for visitor in visitors)
        mismatched = [v for v in visitors if found.get(v.session_id, (0, 0)) != (v.acknowledged, v.acknowledged)]
        lost = acknowledged - sum(distinct for _, distinct in found.values())
        extra = store.count() - before - acknowledged
        print(
            f"[{stored} stored] {args.clients} sessions: {rounds} rounds in {elapsed:.1f} s = {rounds / elapsed:.2f} "
            f"rounds/s; votes acknowledged {acknowledged}, lost {lost}, unacknowledged or doubled {extra}, "
            f"sessions not matching {len(mismatched)}, failed rounds {len(failures)}",
            flush=True,
        )
        for failure in sorted(set(failures))[:3]:
            print(f"[{stored} stored]   failure: {failure}", flush=True)
    finally:
        blocks.close()
        arena.close()
    store.dispose()
    print(f"[{stored} stored] load average after the rounds: {load_average()}", flush=True)
    return {
        **timings,
        "rounds_per_s": rounds / elapsed,
        "intact": lost == 0 and extra == 0 and not mismatched and not failures,
        "export": export_in_process,
        "export_cli": export_cli,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stored", type=int, nargs=2, default=[100, 100_000], help="The two store sizes compared.")
    parser.add_argument("--rounds", type=int, default=40, help="Sequential rounds per size for the latencies.")
    parser.add_argument("--clients", type=int, default=32, help="Concurrent gradio_client sessions.")
    parser.add_argument("--seconds", type=float, default=15.0, help="How long the concurrent sessions play.")
    parser.add_argument(
        "--max-tokens", type=int, default=8, help="Answer length; short keeps the arena's part visible."
    )
    parser.add_argument("--base", default="tiny", help="'tiny' (a random 2-layer Llama) or a base alias or folder.")
    args = parser.parse_args()

    from loraflow.hub.base import resolve_base
    from loraflow.hub.registry import Registry
    from loraflow.serve.launcher import start_server

    prompts, answers = answer_texts(random.Random(0))
    small, large = args.stored
    with tempfile.TemporaryDirectory(prefix="arena-scale-") as location:  # the 100,000-vote store takes ~100 MB
        folder = Path(location)
        base = tiny_base(folder) if args.base == "tiny" else resolve_base(args.base)
        registry = Registry(folder / "registry.json")
        publish_contestants(registry, base, folder)
        with start_server(registry.path, base, max_model_len=512) as server:
            server.wait_ready()
            results = {
                size: measure_size(size, server, registry, prompts, answers, args, folder / str(size))
                for size in (small, large)
            }
    a, b = results[small], results[large]
    labels = {
        "vote": "vote click",
        "new_round": "new round (pairing)",
        "first_update": "ask to first update",
        "reset": "New round button",
    }
    for key, label in labels.items():
        p50, p95 = (percentile(b[key], q) / percentile(a[key], q) for q in (0.5, 0.95))
        print(
            f"result: {label} with {large} stored {spread(b[key])} vs {small} stored {spread(a[key])}: "
            f"ratio p50 {p50:.2f}x p95 {p95:.2f}x"
        )
    ratio = b["rounds_per_s"] / a["rounds_per_s"]
    intact = "no vote lost or doubled" if a["intact"] and b["intact"] else "votes lost, doubled or rounds failed"
    print(
        f"result: {args.clients} sessions {b['rounds_per_s']:.2f} rounds/s with {large} stored vs "
        f"{a['rounds_per_s']:.2f} with {small}: ratio {ratio:.2f}x, {intact}"
    )
    print(
        f"result: export {large} votes {b['export']:.2f} s in process, {b['export_cli']:.2f} s as a command "
        f"(vs {a['export']:.2f} s and {a['export_cli']:.2f} s for {small})"
    )
    if not (a["intact"] and b["intact"]):
        raise SystemExit("votes were lost or doubled, or rounds failed")


if __name__ == "__main__":
    main()
