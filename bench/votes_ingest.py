"""Vote ingest: votes per second from 8 concurrent writers on one SQLite file (WAL), and none lost or doubled.

Two shapes, each measured side by side in one run, the old path against group commit:
- threads: 8 writer threads share one VoteStore in one process (one arena process and its Gradio worker threads);
- processes: 8 writer processes with a VoteStore and one writer thread each (8 arena instances on one file).
`baseline` is VoteStore.record as it was before group commit, kept here: one ORM transaction per vote. `group` is
VoteStore.record now: concurrent callers in one process share a transaction. Each writer waits for every vote's
acknowledgement before it casts the next, and casts every tenth vote twice, as a retry or a double click does.
A measurement ends when the writers have cast --votes votes between them or after --seconds, whichever comes first.

    .venv/bin/python bench/votes_ingest.py --writers 8 --votes 4000 --seconds 2
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import threading
import time
import uuid
from pathlib import Path

PATHS = ("baseline", "group")


def record_alone(store, vote) -> None:
    """The baseline: VoteStore.record before group commit (the bench runs without a rate limit)."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from loraflow.arena.votes import VoteRow

    now = time.time()
    with Session(store.engine) as session, session.begin():
        if session.scalar(select(VoteRow).where(VoteRow.vote_id == vote.vote_id)) is not None:
            return
        session.add(
            VoteRow(
                vote_id=vote.vote_id,
                created=now,
                session_id=vote.session_id,
                prompt=vote.prompt,
                answer_a=vote.answer_a,
                answer_b=vote.answer_b,
                contestant_a=vote.contestant_a,
                contestant_b=vote.contestant_b,
                outcome=vote.outcome,
            )
        )
        session.flush()


def write_votes(url: str, writers: range, count: int, seconds: float, synchronous: str, path: str, barrier):
    """One writer thread per number in `writers`, each casting up to `count` votes for up to `seconds`.

    Returns the span in perf_counter seconds (CLOCK_MONOTONIC, one clock for all processes), the CPU seconds this
    process spent in it, and the ids of the votes acknowledged."""
    from loraflow.arena.votes import Vote, VoteStore

    store = VoteStore(url, rate_limit=None, synchronous=synchronous)
    record = store.record if path == "group" else lambda vote: record_alone(store, vote)
    acknowledged: list[list[str]] = [[] for _ in writers]

    def write(writer: int, ids: list[str], deadline: float) -> None:
        for i in range(count):
            if time.perf_counter() > deadline:
                return
            vote = Vote(
                uuid.uuid4().hex, f"writer-{writer}", f"prompt {writer}-{i}", "Arr! Aye.", "Yes.", "x@1", "base", "a"
            )
            record(vote)
            if i % 10 == 0:
                record(vote)  # a retry of an acknowledged vote
            ids.append(vote.vote_id)

    if barrier is not None:
        barrier.wait()
    began, cpu = time.perf_counter(), time.process_time()
    threads = [
        threading.Thread(target=write, args=(writer, ids, began + seconds))
        for writer, ids in zip(writers, acknowledged)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ended, cpu = time.perf_counter(), time.process_time() - cpu
    store.dispose()
    return began, ended, cpu, [vote_id for ids in acknowledged for vote_id in ids]


def measure(shape: str, path: str, synchronous: str, args, pool, barrier) -> dict:
    from loraflow.arena.votes import VoteStore

    url = f"sqlite:///{Path(tempfile.mkdtemp(prefix='votes-bench-')) / 'votes.db'}"
    VoteStore(url, rate_limit=None).dispose()
    share = args.votes // args.writers
    if shape == "threads":
        spans = [write_votes(url, range(args.writers), share, args.seconds, synchronous, path, None)]
    else:
        jobs = [(url, range(w, w + 1), share, args.seconds, synchronous, path, barrier) for w in range(args.writers)]
        spans = pool.starmap(write_votes, jobs)
    seconds = max(span[1] for span in spans) - min(span[0] for span in spans)
    acknowledged = [vote_id for *_, ids in spans for vote_id in ids]
    reader = VoteStore(url, rate_limit=None)
    stored = [vote.vote_id for vote in reader.votes()]
    reader.dispose()
    return {
        "votes": len(acknowledged),
        "stored": len(stored),
        "lost_or_doubled": len(set(acknowledged) ^ set(stored)) + len(stored) - len(set(stored)),
        "seconds": seconds,
        "votes_per_s": len(acknowledged) / seconds,
        "cpu_us_per_vote": sum(span[2] for span in spans) / len(acknowledged) * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--votes", type=int, default=4000, help="Most votes per measurement, across all writers.")
    parser.add_argument("--seconds", type=float, default=2.0, help="Longest measurement.")
    parser.add_argument("--synchronous", nargs="+", default=["FULL", "NORMAL"], choices=["FULL", "NORMAL"])
    parser.add_argument("--shapes", nargs="+", default=["threads", "processes"], choices=["threads", "processes"])
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    summary, failed = [], False
    with context.Manager() as manager, context.Pool(args.writers) as pool:
        barrier = manager.Barrier(args.writers)
        pool.starmap(time.sleep, [(0,)] * args.writers)  # the processes start and import before any timing
        for shape in args.shapes:
            for synchronous in args.synchronous:
                rates = {}
                for path in PATHS:
                    result = measure(shape, path, synchronous, args, pool, barrier)
                    rates[path] = result["votes_per_s"]
                    failed |= result["lost_or_doubled"] != 0
                    print(
                        f"{shape:<9} synchronous={synchronous:<6} writers={args.writers} path={path:<8} "
                        f"votes={result['votes']} stored={result['stored']} "
                        f"lost_or_doubled={result['lost_or_doubled']} {result['votes_per_s']:.0f} votes/s "
                        f"({result['seconds']:.2f} s, {result['cpu_us_per_vote']:.0f} us CPU per vote)",
                        flush=True,
                    )
                summary.append(
                    f"{shape:<9} synchronous={synchronous:<6} group {rates['group']:.0f} votes/s, "
                    f"baseline {rates['baseline']:.0f} votes/s: ratio {rates['group'] / rates['baseline']:.1f}x"
                )
    print("\n".join(summary))
    if failed:
        raise SystemExit("votes were lost or doubled")


if __name__ == "__main__":
    main()
