"""Vote storage: idempotent ids, rate limits, group commit, concurrent writer processes, a writer killed mid-storm,
export."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import event
from sqlalchemy.exc import OperationalError, StatementError

from loraflow.arena.export import export_preferences, export_training_data, unpaired_feedback
from loraflow.arena.votes import GroupCommit, HeadToHead, RateLimit, RateLimited, Recorded, Vote, VoteStore
from loraflow.hub.errors import LoraflowError
from tests.conftest import REPO, run_loraflow


def make_vote(outcome="a", session="s1", vote_id=None, a="pirate@1", b="base", prompt="What is 2 plus 2?") -> Vote:
    return Vote(
        vote_id=vote_id or uuid.uuid4().hex,
        session_id=session,
        prompt=prompt,
        answer_a=f"Arr! answer from {a}, matey.",
        answer_b=f"Plain answer from {b}.",
        contestant_a=a,
        contestant_b=b,
        outcome=outcome,
    )


@pytest.fixture
def store(tmp_path):
    return VoteStore(str(tmp_path / "votes.db"), rate_limit=None)


@pytest.fixture
def any_store(votes_url):
    """The same behaviour is asked of SQLite and of PostgreSQL."""
    return VoteStore(votes_url, rate_limit=None)


def test_record_keeps_every_field_and_uses_wal(store):
    vote = make_vote("tie", session="visitor-7")
    recorded = store.record(vote)
    assert recorded.created_now
    stored = store.get(vote.vote_id)
    for field in ("prompt", "answer_a", "answer_b", "contestant_a", "contestant_b", "outcome", "session_id"):
        assert getattr(stored, field) == getattr(vote, field)
    assert stored.created > 0 and stored.seq == 1
    with store.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_same_vote_id_is_counted_once(any_store):
    vote = make_vote()
    first = any_store.record(vote)
    again = any_store.record(vote)
    changed = any_store.record(make_vote("b", vote_id=vote.vote_id))
    assert first.created_now and not again.created_now and not changed.created_now
    assert changed.vote.outcome == "a"
    assert any_store.count() == 1


@pytest.mark.parametrize(
    "vote, message",
    [
        (make_vote("maybe"), "outcome"),
        (make_vote(vote_id="x" * 65), "id"),
    ],
)
def test_invalid_votes_are_refused(store, vote, message):
    with pytest.raises(LoraflowError, match=message):
        store.record(vote)
    assert store.count() == 0


def test_two_samples_of_one_version_are_a_vote_and_between_finds_head_to_head_votes(store):
    store.record(make_vote(a="pirate@1", b="pirate@1"))
    store.record(make_vote(a="pirate@2", b="pirate@1"))
    store.record(make_vote(a="pirate@1", b="pirate@2"))
    store.record(make_vote(a="pirate@2", b="base"))
    assert store.votes()[0].same_contestant and store.count() == 4
    assert [v.seq for v in store.votes(between=("pirate@1", "pirate@2"))] == [2, 3]
    assert [v.seq for v in store.votes(between=("pirate@1", "pirate@1"))] == [1]
    store.record(make_vote("tie", a="pirate@1", b="pirate@2"))
    store.record(make_vote("b", a="pirate@2", b="pirate@1"))
    counted = store.head_to_head("pirate@2", "pirate@1")
    assert (counted.wins, counted.losses, counted.draws) == (1, 2, 1)  # a, then b (pirate@1 on A), tie, b
    assert counted == HeadToHead.of(store.votes(), "pirate@2", "pirate@1")
    assert store.head_to_head("pirate@1", "pirate@1").games == 0


def test_head_to_head_counts_each_vote_once_reading_only_the_votes_stored_since(any_store):
    other = VoteStore(any_store.url, rate_limit=None)  # another writer: a second arena instance, or the simulator
    reads = []

    @event.listens_for(any_store.engine, "before_cursor_execute")
    def _read(connection, cursor, statement, parameters, context, executemany):
        if "seq >" in statement:
            reads.append(list(parameters.values() if isinstance(parameters, dict) else parameters))

    pairs = [("pirate@2", "pirate@1", "a"), ("pirate@1", "pirate@2", "a"), ("pirate@2", "base", "b")]
    pairs += [("pirate@1", "pirate@2", "both_bad"), ("pirate@2", "pirate@1", "tie"), ("pirate@1", "pirate@1", "a")]
    for number, (a, b, outcome) in enumerate(pairs * 3):
        (any_store if number % 2 else other).record(make_vote(outcome, a=a, b=b))
        stored = any_store.votes()
        for first, second in (("pirate@2", "pirate@1"), ("pirate@1", "pirate@2")):
            assert any_store.head_to_head(first, second) == HeadToHead.of(stored, first, second)
    final = any_store.head_to_head("pirate@2", "pirate@1")
    assert (final.wins, final.losses, final.draws) == (3, 3, 6)  # per round of pairs: a win, a loss, two draws
    counting = [params for params in reads if len(params) == 1]
    assert counting[0] == [0] and counting[-1] == [len(pairs) * 3]  # the first call counts all; later ones the new
    assert any_store.head_to_head("pirate@1", "pirate@1").games == 0


def test_rate_limit_is_per_session(tmp_path):
    limited = VoteStore(str(tmp_path / "votes.db"), rate_limit=RateLimit(votes=3, window_s=60))
    kept = [make_vote(session="eager") for _ in range(3)]
    for vote in kept:
        limited.record(vote)
    with pytest.raises(RateLimited, match="try again"):
        limited.record(make_vote(session="eager"))
    assert not limited.record(kept[0]).created_now  # a retry of a stored vote is not refused
    assert limited.record(make_vote(session="patient")).created_now
    assert limited.count() == 4


def test_votes_filters_by_contestant_name_and_seq(store):
    store.record(make_vote(a="pirate@1", b="base"))
    store.record(make_vote(a="other@1", b="base"))
    store.record(make_vote(a="pirate@2", b="pirate@1"))
    assert [v.seq for v in store.votes(name="pirate")] == [1, 3]
    assert [v.seq for v in store.votes(contestants=["pirate@2"])] == [3]
    assert [v.seq for v in store.votes(after_seq=1)] == [2, 3]


def count_commits(store: VoteStore) -> list:
    commits = []
    event.listen(store.engine, "commit", lambda connection: commits.append(connection))
    return commits


def test_concurrent_callers_share_commits_and_hear_back_only_after_commit(votes_url):
    store = VoteStore(votes_url, rate_limit=None)
    reader = VoteStore(votes_url, rate_limit=None)  # its own connections see committed votes only
    commits = count_commits(store)
    threads, per_thread = 8, 25
    shared = [f"shared-{i}" for i in range(per_thread)]  # every thread casts these too: concurrent repeats
    casts = [[f"t{number}-{i}" for i in range(per_thread)] for number in range(threads)]
    created_now = {vote_id: [] for vote_id in shared + [vote_id for own in casts for vote_id in own]}
    start = threading.Barrier(threads)

    def cast(number: int) -> None:
        start.wait()
        for vote_id in [vote_id for pair in zip(casts[number], shared[number:] + shared[:number]) for vote_id in pair]:
            recorded = store.record(make_vote(vote_id=vote_id, session=f"t{number}"))
            created_now[vote_id].append(recorded.created_now)
            assert reader.get(vote_id) == recorded.vote  # committed before record returned

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(cast, range(threads)))  # re-raises a failed assertion from any thread
    assert {vote_id: flags.count(True) for vote_id, flags in created_now.items()} == dict.fromkeys(created_now, 1)
    assert sorted(vote.vote_id for vote in reader.votes()) == sorted(created_now)
    assert len(commits) < sum(len(flags) for flags in created_now.values())  # some calls shared a commit


def test_the_rate_limit_holds_for_concurrent_callers_of_one_session(votes_url):
    store = VoteStore(votes_url, rate_limit=RateLimit(votes=10, window_s=60))
    start = threading.Barrier(8)

    def cast(_) -> list[bool]:
        start.wait()
        accepted = []
        for _ in range(5):
            try:
                accepted.append(store.record(make_vote(session="eager")).created_now)
            except RateLimited:
                accepted.append(False)
        return accepted

    with ThreadPoolExecutor(8) as pool:
        accepted = [flag for flags in pool.map(cast, range(8)) for flag in flags]
    assert accepted.count(True) == 10 and store.count() == 10


def test_one_commit_keeps_each_votes_own_outcome(votes_url):
    store = VoteStore(votes_url, rate_limit=RateLimit(votes=2, window_s=60))
    earlier = store.record(make_vote(session="eager")).vote
    commits = count_commits(store)
    results = store._record_batch(
        [
            make_vote(session="eager"),  # the session's second vote in the window: stored
            make_vote(session="eager"),  # its third: refused
            make_vote(session="calm", vote_id="twice"),
            make_vote("b", session="calm", vote_id="twice"),  # a repeat inside the same commit
            earlier,  # a retry of a stored vote is not refused
        ]
    )
    assert len(commits) == 1
    second, third, first_twice, again_twice, retried = results
    assert second.created_now and second.vote.session_id == "eager"
    assert isinstance(third, RateLimited) and "try again" in str(third)
    assert first_twice.created_now and not again_twice.created_now
    assert again_twice.vote == first_twice.vote and again_twice.vote.outcome == "a"
    assert retried == Recorded(earlier, created_now=False)
    assert store.count() == 3


def test_a_vote_the_database_refuses_fails_only_its_own_caller(votes_url):
    store = VoteStore(votes_url, rate_limit=None)
    refused = make_vote(prompt={"not": "text"})
    before, bad, after = store._record_batch([make_vote(), refused, make_vote()])
    assert before.created_now and after.created_now
    assert isinstance(bad, StatementError)
    assert [vote.vote_id for vote in store.votes()] == [before.vote.vote_id, after.vote.vote_id]
    with pytest.raises(StatementError):
        store.record(refused)


def test_a_failed_commit_reaches_its_caller_and_the_next_caller_is_served():
    def commit_batch(votes):
        if votes[0].vote_id == "doomed":
            raise OperationalError("COMMIT", {}, Exception("disk I/O error"))
        return [Recorded(vote, created_now=True) for vote in votes]

    group = GroupCommit(commit_batch)
    with pytest.raises(OperationalError, match="disk I/O error"):
        group.submit(make_vote(vote_id="doomed"))
    assert group.submit(make_vote(vote_id="next")).vote.vote_id == "next"


def _writer(url: str, writer: int, count: int, start) -> list[str]:
    from loraflow.arena.votes import VoteStore

    store = VoteStore(url, rate_limit=None)
    ids = [f"w{writer}-{i}" for i in range(count)]
    start.wait()
    for vote_id in ids:
        store.record(make_vote(vote_id=vote_id, session=f"writer-{writer}"))
        store.record(make_vote(vote_id=vote_id, session=f"writer-{writer}"))  # the double click
    return ids


def test_concurrent_writer_processes_lose_and_double_nothing(votes_url):
    url = votes_url
    VoteStore(url, rate_limit=None)
    context = multiprocessing.get_context("spawn")
    writers, per_writer = 8, 60
    with context.Manager() as manager:
        start = manager.Barrier(writers)
        with context.Pool(writers) as pool:
            written = pool.starmap(_writer, [(url, w, per_writer, start) for w in range(writers)])
    expected = {vote_id for ids in written for vote_id in ids}
    stored = VoteStore(url, rate_limit=None).votes()
    assert len(stored) == writers * per_writer
    assert {v.vote_id for v in stored} == expected
    assert sorted(v.seq for v in stored) == list(range(1, len(stored) + 1))


STORM = """
import sys, uuid
from loraflow.arena.votes import Vote, VoteStore
store = VoteStore(sys.argv[1], rate_limit=None)
for i in range(100000):
    vote_id = f"{sys.argv[2]}-{i}"
    store.record(Vote(vote_id, "storm", "p", "a", "b", "x@1", "base", "a"))
    print(vote_id, flush=True)
"""


def test_writer_killed_mid_storm_loses_no_acknowledged_vote(votes_url):
    url = votes_url
    VoteStore(url, rate_limit=None)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    steady = subprocess.Popen([sys.executable, "-c", STORM, url, "steady"], stdout=subprocess.PIPE, text=True, env=env)
    victim = subprocess.Popen([sys.executable, "-c", STORM, url, "victim"], stdout=subprocess.PIPE, text=True, env=env)
    acknowledged = []
    try:
        for line in victim.stdout:
            acknowledged.append(line.strip())
            if len(acknowledged) == 300:
                os.kill(victim.pid, signal.SIGKILL)
                break
        victim.wait(30)
        # whatever the victim had printed before it died was acknowledged too
        acknowledged += [line.strip() for line in victim.stdout.read().splitlines() if line.strip()]
    finally:
        steady.kill()
        steady.wait(30)
        victim.stdout.close()
        steady.stdout.close()
    assert victim.returncode == -signal.SIGKILL
    stored = {v.vote_id for v in VoteStore(url, rate_limit=None).votes()}
    assert set(acknowledged) <= stored
    assert len(stored) == len({v for v in stored})


def test_export_makes_trl_pairs_counts_ties_and_keeps_both_bad_aside(store, tmp_path):
    store.record(make_vote("a", prompt="p1"))
    store.record(make_vote("b", prompt="p2"))
    store.record(make_vote("tie", prompt="p3"))
    store.record(make_vote("both_bad", prompt="p4"))
    report = export_preferences(store.votes(name="pirate"), tmp_path / "prefs.jsonl")
    pairs = [json.loads(line) for line in (tmp_path / "prefs.jsonl").read_text().splitlines()]
    assert (report.pairs, report.ties, report.both_bad) == (2, 1, 1)
    assert pairs[0]["prompt"] == "p1" and pairs[0]["chosen"].startswith("Arr!")
    assert pairs[0]["rejected"].startswith("Plain")
    assert pairs[1]["prompt"] == "p2" and pairs[1]["chosen"].startswith("Plain")
    assert pairs[1]["rejected"].startswith("Arr!")
    aside = [json.loads(line) for line in report.both_bad_out.read_text().splitlines()]
    assert [record["prompt"] for record in aside] == ["p4"]


def test_votes_export_command_writes_data_the_dpo_loader_accepts(store, tmp_path):
    from loraflow.hub.data import load_records

    for outcome in ("a", "b", "a", "tie", "both_bad"):
        store.record(make_vote(outcome))
    result = run_loraflow("votes", "export", "pirate", "--out", str(tmp_path / "prefs.jsonl"), "--votes", store.url)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary == {"pairs": 3, "ties": 1, "both_bad": 1, "first_seq": 1, "last_seq": 3}
    assert "1 ties left out" in result.stdout
    assert len(load_records(tmp_path / "prefs.jsonl", "preference")) == 3


def test_unpaired_feedback_labels_each_answer_by_the_vote(store):
    for outcome, prompt in (("a", "p1"), ("b", "p2"), ("tie", "p3"), ("both_bad", "p4")):
        store.record(make_vote(outcome, prompt=prompt))
    votes = store.votes(name="pirate")
    records = unpaired_feedback(votes)
    pirate, plain = "Arr! answer from pirate@1, matey.", "Plain answer from base."
    assert [(r["prompt"], r["completion"], r["label"], r["model"]) for r in records] == [
        ("p1", pirate, True, "pirate@1"),
        ("p1", plain, False, "base"),
        ("p2", pirate, False, "pirate@1"),
        ("p2", plain, True, "base"),
        ("p3", pirate, True, "pirate@1"),
        ("p3", plain, True, "base"),
        ("p4", pirate, False, "pirate@1"),
        ("p4", plain, False, "base"),
    ]
    assert [(r["vote_id"], r["seq"]) for r in records[::2]] == [(v.vote_id, v.seq) for v in votes]


def test_export_training_data_writes_the_format_the_trainer_reads(store, tmp_path):
    from loraflow.hub.data import load_records

    for outcome in ("a", "tie", "both_bad"):
        store.record(make_vote(outcome))
    votes = store.votes(name="pirate")
    report = export_training_data(votes, tmp_path / "answers.jsonl", "unpaired")
    assert (report.pairs, report.ties, report.both_bad, report.first_seq, report.last_seq) == (1, 1, 1, 1, 3)
    assert (report.desirable, report.undesirable, report.examples, report.both_bad_out) == (3, 3, 6, None)
    written = load_records(tmp_path / "answers.jsonl", "unpaired")
    assert [record["label"] for record in written] == [True, False, True, True, False, False]
    pairs = export_training_data(votes, tmp_path / "prefs.jsonl", "preference")
    assert (pairs.examples, pairs.both_bad_out) == (1, tmp_path / "prefs.both_bad.jsonl")
    with pytest.raises(LoraflowError, match="as 'messages' data; the formats are preference, unpaired"):
        export_training_data(votes, tmp_path / "chat.jsonl", "messages")
    assert not (tmp_path / "chat.jsonl").exists()


def test_votes_export_command_writes_unpaired_data_with_format(store, tmp_path):
    for outcome in ("b", "tie", "both_bad"):
        store.record(make_vote(outcome))
    out, export = tmp_path / "answers.jsonl", ["votes", "export", "pirate", "--votes", store.url]
    result = run_loraflow(*export, "--out", str(out), "--format", "unpaired")
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary == {
        "pairs": 1,
        "ties": 1,
        "both_bad": 1,
        "first_seq": 1,
        "last_seq": 3,
        "format": "unpaired",
        "desirable": 3,
        "undesirable": 3,
    }
    assert "3 desirable and 3 undesirable answers" in result.stdout
    labels = [json.loads(line)["label"] for line in out.read_text().splitlines()]
    assert labels == [False, True, True, True, False, False]
    bad = run_loraflow(*export, "--out", str(tmp_path / "x.jsonl"), "--format", "text", check=False)
    assert bad.returncode == 2 and "'text'" in bad.stderr and "preference, unpaired" in bad.stderr
    assert not (tmp_path / "x.jsonl").exists()


def random_bytes(path):
    path.write_bytes(os.urandom(4096))
    return str(path)


def sqlite_header_then_garbage(path):
    path.write_bytes(b"SQLite format 3\x00" + os.urandom(4096))
    return str(path)


def a_folder(path):
    path.mkdir()
    return str(path)


@pytest.mark.parametrize(
    "make_bad, message",
    [
        (a_folder, "is a folder"),
        (random_bytes, "not a SQLite database"),
        (sqlite_header_then_garbage, "damaged SQLite file"),
        (lambda path: "notadb://x", "no database driver for 'notadb'"),
    ],
    ids=["folder", "random-bytes", "header-then-garbage", "unknown-scheme"],
)
def test_a_bad_vote_database_is_refused_in_one_line_and_left_untouched(tmp_path, make_bad, message):
    votes = make_bad(tmp_path / "votes.db")
    before = (tmp_path / "votes.db").read_bytes() if (tmp_path / "votes.db").is_file() else None
    with pytest.raises(LoraflowError, match=message):
        VoteStore(votes)  # what `loraflow arena` opens
    export = ["votes", "export", "pirate", "--out", str(tmp_path / "prefs.jsonl")]
    for command in (export, ["votes", "leaderboard", "pirate"]):
        result = run_loraflow(*command, "--votes", votes, check=False, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "prefs.jsonl").exists()
    if before is not None:
        assert (tmp_path / "votes.db").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ([] if votes == "notadb://x" else ["votes.db"])  # no side files


def test_exporting_a_name_without_votes_is_refused_naming_those_with_votes(store, tmp_path):
    store.record(make_vote(a="pirate@1", b="base"))
    store.record(make_vote(a="poet@2", b="base"))
    out = tmp_path / "prefs.jsonl"
    result = run_loraflow("votes", "export", "nosuch", "--out", str(out), "--votes", store.url, check=False)
    assert result.returncode == 2, result.stderr
    assert "'nosuch'" in result.stderr and "pirate, poet" in result.stderr
    assert not out.exists()


def test_length_balancing_leaves_as_many_longer_winners_as_shorter_ones():
    from loraflow.arena.export import balance_lengths, winner_is_longer

    def judged(number: int, outcome: str, a: str, b: str) -> Vote:
        return Vote(f"v{number}", "s", "p", a, b, "x@1", "x@2", outcome, seq=number)

    long, short = "a long and wordy answer", "short"
    votes = [judged(i, "a", long, short) for i in range(6)]  # the longer answer wins six times
    votes += [judged(10, "b", long, short), judged(11, "a", short, long)]  # the shorter one twice
    votes += [judged(20, "a", "same length", "equal words"), judged(21, "tie", long, short)]
    kept, dropped = balance_lengths(votes, seed=1)
    assert len(dropped) == 4 and all(winner_is_longer(v) for v in dropped)
    assert sum(winner_is_longer(v) is True for v in kept if v.outcome != "tie") == 2
    assert {"v10", "v11", "v20", "v21"} <= {v.vote_id for v in kept}
    assert [v.seq for v in kept] == sorted(v.seq for v in kept)
    assert balance_lengths(votes, seed=1) == (kept, dropped)  # the same seed leaves out the same votes
