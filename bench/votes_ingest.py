"""Vote ingest: votes per second with concurrent writer processes on one SQLite file (WAL), and none lost.

Each writer process records its share of votes through `VoteStore.record` (one committed transaction per
vote, as the arena does) and, to exercise idempotency, records every tenth vote twice.

    .venv/bin/python bench/votes_ingest.py --writers 8 --votes 4000
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
import uuid
from pathlib import Path


def write_votes(url: str, writer: int, count: int, synchronous: str, start, done) -> None:
    from loraflow.arena.votes import Vote, VoteStore

    store = VoteStore(url, rate_limit=None, synchronous=synchronous)
    votes = [
        Vote(
            vote_id=uuid.uuid4().hex,
            session_id=f"writer-{writer}",
            prompt=f"prompt {writer}-{i}",
            answer_a="Arr! an answer, matey.",
            answer_b="An answer.",
            contestant_a="pirate@1",
            contestant_b="base",
            outcome="a",
        )
        for i in range(count)
    ]
    start.wait()
    for i, vote in enumerate(votes):
        store.record(vote)
        if i % 10 == 0:
            store.record(vote)  # a retry of an acknowledged vote
    done.put(writer)


def run(writers: int, total: int, synchronous: str) -> dict:
    from loraflow.arena.votes import VoteStore

    folder = Path(tempfile.mkdtemp(prefix="votes-bench-"))
    url = f"sqlite:///{folder / 'votes.db'}"
    VoteStore(url, rate_limit=None)
    context = multiprocessing.get_context("spawn")
    start, done = context.Barrier(writers + 1), context.Queue()
    share = total // writers
    processes = [
        context.Process(target=write_votes, args=(url, w, share, synchronous, start, done)) for w in range(writers)
    ]
    for process in processes:
        process.start()
    start.wait()
    began = time.perf_counter()
    for _ in processes:
        done.get()
    elapsed = time.perf_counter() - began
    for process in processes:
        process.join()
    stored = VoteStore(url, rate_limit=None).count()
    written = share * writers
    return {
        "writers": writers,
        "votes": written,
        "stored": stored,
        "seconds": elapsed,
        "votes_per_s": written / elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--votes", type=int, default=4000, help="Total votes across all writers.")
    args = parser.parse_args()
    for synchronous in ("FULL", "NORMAL"):
        result = run(args.writers, args.votes, synchronous)
        lost = result["votes"] - result["stored"]
        print(
            f"synchronous={synchronous:<6} writers={result['writers']} votes={result['votes']} "
            f"stored={result['stored']} "
            f"lost_or_doubled={lost} {result['votes_per_s']:.0f} votes/s ({result['seconds']:.2f} s)"
        )
        if lost:
            raise SystemExit("votes were lost or doubled")


if __name__ == "__main__":
    main()
