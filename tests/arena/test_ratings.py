"""Ratings math on constructed vote sets, people's and judges' boards, the background refit, and the matchmaking
policy."""

from __future__ import annotations

import random
import resource
import time
from dataclasses import replace

import numpy as np
import pytest
from sqlalchemy import insert

from loraflow.arena.judge import judge_session
from loraflow.arena.matchmaking import choose_pair
from loraflow.arena.ratings import (
    ELO_START,
    SCALE,
    LeaderboardFit,
    LiveLeaderboard,
    Match,
    Ratings,
    bradley_terry,
    elo_history,
    leaderboard,
    matches_from_votes,
    online_elo,
    plot_elo_history,
    style_counts,
    win_probability,
)
from loraflow.arena.settings import AI, ALL, HUMAN, HygieneSettings
from loraflow.arena.votes import HeadToHead, Vote, VoteRow, VoteStore
from loraflow.hub.errors import LoraflowError


def votes_from(results: list[tuple[str, str, str]]) -> list[Vote]:
    return [Vote(f"v{i}", "s", "p", "x", "y", a, b, outcome, seq=i + 1) for i, (a, b, outcome) in enumerate(results)]


def constructed_votes(seed: int = 0) -> list[Vote]:
    """strong beats mid 80% of the time, mid beats weak 80%, strong beats weak 95%."""
    rng = random.Random(seed)
    odds = {("strong", "mid"): 0.8, ("mid", "weak"): 0.8, ("strong", "weak"): 0.95}
    results = []
    for _ in range(100):
        for (a, b), p in odds.items():
            if rng.random() < 0.5:
                results.append((a, b, "a" if rng.random() < p else "b"))
            else:
                results.append((b, a, "b" if rng.random() < p else "a"))
    return votes_from(results)


def test_clearly_better_contestant_ranks_first_with_intervals_around_the_estimate():
    rows = leaderboard(constructed_votes())
    assert [r.contestant for r in rows] == ["strong", "mid", "weak"]
    for row in rows:
        assert row.bt_low <= row.bt <= row.bt_high
        assert row.votes == 200 and row.wins + row.losses + row.draws == 200
    assert rows[0].bt_low > rows[2].bt_high  # separated beyond doubt
    assert rows[0].elo > rows[1].elo > rows[2].elo
    for row in rows:  # the answers are alike, so style control changes nothing
        assert row.style_low <= row.style_bt <= row.style_high and abs(row.style_bt - row.bt) < 1.0


def test_bradley_terry_recovers_known_odds():
    # 3:1 odds means 400 * log10(3) = 191 Elo points apart.
    matches = [Match("a", "b", 1.0)] * 300 + [Match("a", "b", 0.0)] * 100
    ratings = bradley_terry(matches, prior=0.0)
    assert abs((ratings["a"] - ratings["b"]) - 190.8) < 1.0


def test_draws_and_both_bad_count_as_half():
    drawn = votes_from([("a", "b", "tie"), ("a", "b", "both_bad")] * 10)
    rows = {r.contestant: r for r in leaderboard(drawn)}
    assert abs(rows["a"].bt - rows["b"].bt) < 1e-6 and abs(rows["a"].style_bt - rows["b"].style_bt) < 1e-6
    assert rows["a"].draws == 20 and rows["a"].wins == 0


def test_undefeated_contestant_gets_a_finite_rating():
    ratings = bradley_terry([Match("a", "b", 1.0)] * 5)
    assert ratings["a"] > ratings["b"] and ratings["a"] < 2000


def test_one_vote_gives_a_wide_interval_not_a_point():
    rows = {r.contestant: r for r in leaderboard(votes_from([("a", "b", "a")]))}
    for row in rows.values():
        assert row.bt_high - row.bt_low > 200 and row.style_high - row.style_low > 200
        assert row.bt_low < row.bt < row.bt_high
    assert rows["a"].bt > rows["b"].bt and rows["a"].bt_low < rows["b"].bt_high  # one vote decides nothing


def styled_votes(rng: np.random.Generator, truth: dict[str, float], count: int, length_bias: float) -> list[Vote]:
    """Votes under Bradley-Terry with `truth` (Elo, mean 1000) plus `length_bias` logits per unit of the
    normalized length difference; answers are runs of 'x' whose length depends on the contestant."""
    names = sorted(truth)
    typical = {name: 40 + 40 * i for i, name in enumerate(names)} | {"long": 400, "short": 50}
    votes = []
    for number in range(count):
        a, b = rng.choice(names, 2, replace=False)
        length_a, length_b = (int(typical[name] * rng.lognormal(0, 0.6)) + 1 for name in (a, b))
        difference = (length_a - length_b) / (length_a + length_b)
        logit = (truth[a] - truth[b]) / SCALE + length_bias * difference
        outcome = "a" if rng.random() < 1 / (1 + np.exp(-logit)) else "b"
        votes.append(Vote(f"v{number}", "s", "p", "x" * length_a, "x" * length_b, a, b, outcome, seq=number + 1))
    return votes


def test_style_control_removes_a_planted_length_bias():
    # "long" and "short" are equally good; voters prefer the longer answer whoever wrote it.
    truth = {"long": ELO_START, "short": ELO_START, "mid": ELO_START}
    board = Ratings().add(styled_votes(np.random.default_rng(0), truth, 3000, length_bias=3.0)).fit()
    rows = {r.contestant: r for r in board.ratings}
    assert rows["long"].bt_low > rows["short"].bt_high  # the raw ratings reward length
    assert rows["long"].style_low < rows["short"].style_high  # the style-controlled ones do not
    assert abs(rows["long"].style_bt - rows["short"].style_bt) < 0.25 * (rows["long"].bt - rows["short"].bt)
    length = board.style[0]
    assert length.feature == "length" and length.low > 0  # positive beyond doubt
    assert all(effect.low < 0 < effect.high for effect in board.style[1:])  # the answers have no markdown


def test_style_counts_read_markdown():
    answer = "# Title\n\nSome **bold** and __bold__ text.\n\n- one\n- two\n1. three\n## Sub\n"
    assert style_counts(answer) == (len(answer), 2, 3, 2)
    assert style_counts("plain #not a header, 2*3*4") == (len("plain #not a header, 2*3*4"), 0, 0, 0)


def test_intervals_cover_the_true_rating_about_95_percent_of_the_time():
    # Raw ratings on votes without a style bias; style-controlled ones on votes with a length bias.
    rng = np.random.default_rng(1)
    covered = {"raw": [], "style": []}
    for votes_per_set in (12, 200):
        for _ in range(40):
            truth = dict(zip(["p", "q", "r", "s"], ELO_START + rng.normal(0, 150, 4)))
            centre = np.mean(list(truth.values())) - ELO_START
            for model, bias in (("raw", 0.0), ("style", 1.0)):
                for row in Ratings().add(styled_votes(rng, truth, votes_per_set, length_bias=bias)).fit().ratings:
                    low, high = (row.bt_low, row.bt_high) if model == "raw" else (row.style_low, row.style_high)
                    covered[model].append(low <= truth[row.contestant] - centre <= high)
    assert np.mean(covered["raw"]) >= 0.85 and np.mean(covered["style"]) >= 0.85


def test_incremental_ratings_equal_a_full_refit():
    truth = {"p": 1100.0, "q": 1000.0, "r": 900.0}
    early = styled_votes(np.random.default_rng(2), truth, 600, length_bias=1.0)
    late = votes_from([("p", "late", "tie"), ("late", "q", "a"), ("r", "late", "both_bad")])  # a newcomer
    votes = [replace(v, vote_id=f"v{i}", seq=i + 1) for i, v in enumerate(early + late)]
    incremental = Ratings()
    for start in range(0, len(votes), 97):
        board = incremental.add(votes[start : start + 97]).fit()
    full = Ratings().add(votes).fit()
    assert board.votes == full.votes == len(votes) and board.last_seq == incremental.last_seq == len(votes)
    for mine, theirs in zip(board.ratings, full.ratings):
        assert (mine.contestant, mine.votes, mine.wins, mine.draws) == (
            theirs.contestant,
            theirs.votes,
            theirs.wins,
            theirs.draws,
        )
        for name in ("elo", "bt", "bt_low", "bt_high", "style_bt", "style_low", "style_high"):
            assert abs(getattr(mine, name) - getattr(theirs, name)) < 1e-3, name
    for mine, theirs in zip(board.style, full.style):
        assert abs(mine.elo - theirs.elo) < 1e-3 and abs(mine.high - theirs.high) < 1e-3
    assert board.elo_series == full.elo_series


def test_leaderboard_fit_reads_only_new_votes_and_refits_only_after_some():
    stored = votes_from([("a", "b", "a"), ("b", "c", "tie"), ("a", "c", "a")])
    reads = []

    def read_votes(after_seq: int = 0) -> list[Vote]:
        reads.append(after_seq)
        return [v for v in stored if v.seq > after_seq]

    fit = LeaderboardFit(read_votes)
    first = fit.refresh()
    assert first[ALL].votes == 3 and first.seen_seq == 3 and reads == [0]
    assert fit.refresh() is first and reads == [0, 3]  # nothing new: the same fit, no refit
    stored.append(Vote("v9", "s", "p", "x", "y", "c", "a", "a", seq=4))
    assert fit.refresh()[ALL].votes == 4 and reads == [0, 3, 3]


def seed(store: VoteStore, count: int, judge_every: int = 0) -> None:
    """`count` votes straight into the table, a few minutes apart per session (as people vote, so hygiene keeps
    them), `a@1` winning 70% of its votes against `b@1`; every `judge_every`-th vote a judge's."""
    rng = random.Random(count)
    rows = []
    for number in range(count):
        judged = judge_every and number % judge_every == 0
        session = judge_session("pirate", number) if judged else f"guest:seeded-{number % 200}"
        a, b = ("a@1", "b@1") if rng.random() < 0.5 else ("b@1", "a@1")
        won = rng.random() < 0.7
        outcome = "a" if won == (a == "a@1") else "b"
        answers = {"answer_a": f"answer {rng.random()}", "answer_b": f"another answer {rng.random()}"}
        created = 1.7e9 + (number // 200) * 300.0 + number % 200
        row = {"vote_id": f"v{number}", "created": created, "session_id": session, "prompt": "p"}
        rows.append(row | answers | {"contestant_a": a, "contestant_b": b, "outcome": outcome})
    with store.engine.begin() as connection:
        connection.execute(insert(VoteRow.__table__), rows)


def test_live_leaderboard_refits_in_its_own_process_and_refresh_includes_every_vote(tmp_path):
    store = VoteStore(str(tmp_path / "votes.db"), rate_limit=None)
    seed(store, 20_000)
    live = LiveLeaderboard(store.url, poll_s=0.05, hygiene=HygieneSettings())
    try:
        assert live.latest(ALL) is None  # the first fit is under way in the other process; nothing is computed here
        cpu_before, children_before = time.process_time(), resource.getrusage(resource.RUSAGE_CHILDREN)
        boards = live.refresh()
        cpu_here = time.process_time() - cpu_before
        assert boards[ALL].votes == boards[HUMAN].votes == 20_000 and boards[AI].votes == 0
        assert live.latest(HUMAN) is boards[HUMAN]
        store.record(Vote("late", "guest:late", "p", "x", "y", "b@1", "a@1", "a"))
        live.wake()
        deadline = time.monotonic() + 60
        while live.latest(ALL).votes < 20_001 and time.monotonic() < deadline:
            time.sleep(0.02)  # the background refit after a wake; polled, with a deadline
        assert live.latest(ALL).votes == 20_001 and live.latest(ALL).last_seq == 20_001
    finally:
        live.close()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_there = children.ru_utime + children.ru_stime - children_before.ru_utime - children_before.ru_stime
    # Screening and fitting 20,000 votes cost the other process CPU time; this one only waited for the result.
    assert cpu_there > 0.5 and cpu_here < 0.1 * cpu_there, (cpu_here, cpu_there)


def test_live_leaderboard_refresh_reports_a_store_it_cannot_read(tmp_path):
    store = VoteStore(str(tmp_path / "votes.db"), rate_limit=None)
    live = LiveLeaderboard(store.url, poll_s=0.05)
    (tmp_path / "votes.db").unlink()  # the process opens the store as a reader: a missing database ends it
    try:
        with pytest.raises(LoraflowError, match="its process exited"):
            live.refresh(timeout_s=120)
    finally:
        live.close()


def test_live_leaderboard_starts_its_process_again_after_it_was_killed(tmp_path):
    store = VoteStore(str(tmp_path / "votes.db"), rate_limit=None)
    store.record(Vote("first", "guest:a", "p", "x", "y", "a@1", "b@1", "a"))
    live = LiveLeaderboard(store.url, poll_s=0.05, restart_after_s=0.0)
    try:
        assert live.refresh()[HUMAN].votes == 1
        killed = live._process
        killed.kill()
        killed.wait()
        store.record(Vote("second", "guest:b", "p", "x", "y", "b@1", "a@1", "a"))
        deadline = time.monotonic() + 60
        while True:  # the arena's side notices the closed pipe; a refresh then starts a new process
            try:
                boards = live.refresh(timeout_s=60)
                break
            except LoraflowError:
                assert time.monotonic() < deadline
        assert boards[HUMAN].votes == 2 and live._process is not killed
        assert live.latest(HUMAN) is boards[HUMAN]
    finally:
        live.close()


def people_and_a_judge(judge_votes: int) -> list[Vote]:
    """People: `good@1` beats `bad@1` 3 times in 4, in 200 votes; a judge: `bad@1` wins every one of its votes."""
    people = [("good@1", "bad@1", "a" if i % 4 else "b") for i in range(200)]
    votes = [replace(v, session_id=f"guest:{i}") for i, v in enumerate(votes_from(people))]
    for number in range(judge_votes):
        seq = len(votes) + 1
        votes.append(
            Vote(f"j{number}", judge_session("pirate", number), "p", "x", "y", "good@1", "bad@1", "b", seq=seq)
        )
    return votes


def test_judges_votes_are_rated_apart_and_never_move_the_peoples_board():
    votes = people_and_a_judge(judge_votes=1000)
    people = [v for v in votes if not v.session_id.startswith("judge-")]
    boards = LeaderboardFit(lambda after_seq=0: [v for v in votes if v.seq > after_seq]).refresh()
    human, ai, everyone = boards[HUMAN], boards[AI], boards[ALL]
    assert (human.voters, ai.voters, everyone.voters) == (HUMAN, AI, ALL)
    assert (human.votes, ai.votes, everyone.votes) == (200, 1000, 1200)
    alone = Ratings().add(people).fit()
    assert [(r.contestant, r.votes, r.wins) for r in human.ratings] == [("good@1", 200, 150), ("bad@1", 200, 50)]
    for mine, theirs in zip(human.ratings, alone.ratings):
        assert mine.bt == pytest.approx(theirs.bt) and mine.style_bt == pytest.approx(theirs.style_bt)
    assert [r.contestant for r in ai.ratings] == ["bad@1", "good@1"] and ai.ratings[0].wins == 1000
    assert [r.contestant for r in everyone.ratings] == ["bad@1", "good@1"]  # mixed, the judge would outvote people
    assert human.ratings[0].bt_low > human.ratings[1].bt_high


def test_each_board_counts_what_hygiene_left_out_of_its_own_votes():
    votes = people_and_a_judge(judge_votes=3)
    # One person's answer and one judged answer name their models: identity leaks, one on each board.
    votes[0] = replace(votes[0], answer_a="I am good@1.")
    votes[-1] = replace(votes[-1], answer_b="bad@1 here.")
    votes = [replace(v, created=1.7e9 + 60.0 * v.seq) for v in votes]  # a person's pace, so nothing else is left out
    fit = LeaderboardFit(lambda after_seq=0: [v for v in votes if v.seq > after_seq], HygieneSettings(), voters=[AI])
    boards = fit.refresh()
    assert boards[AI].excluded == {"identity leak": 1} and boards[AI].votes == 2
    with pytest.raises(KeyError):
        boards[HUMAN]  # only the boards asked for are fitted
    boards = LeaderboardFit(lambda after_seq=0: votes, HygieneSettings(), voters=[HUMAN, ALL]).refresh()
    assert boards[HUMAN].excluded == {"identity leak": 1} and boards[HUMAN].votes == 199
    assert boards[ALL].excluded == {"identity leak": 2} and boards[ALL].votes == 201
    with pytest.raises(LoraflowError, match="--voters robots: give human, ai or all"):
        LeaderboardFit(lambda after_seq=0: votes, voters=["robots"])


def test_elo_history_follows_every_vote_and_the_plot_is_written(tmp_path):
    votes = constructed_votes()
    score = {"a": 1.0, "b": 0.0}
    history = elo_history([Match(v.contestant_a, v.contestant_b, score[v.outcome], v.seq) for v in votes])
    assert len(history) == len(votes)
    assert history[-1][1] == online_elo([Match(v.contestant_a, v.contestant_b, score[v.outcome]) for v in votes])
    plot_elo_history(votes, tmp_path / "elo.png")
    assert (tmp_path / "elo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pairs_are_two_different_contestants_on_random_sides():
    rng = random.Random(0)
    pairs = [choose_pair(["base", "x@1", "x@2"], {}, {}, rng) for _ in range(300)]
    assert all(p.a != p.b for p in pairs)
    assert 100 < sum("base" in (p.a, p.b) for p in pairs) < 300
    firsts = sum(p.a == "x@2" for p in pairs if {p.a, p.b} == {"x@1", "x@2"})
    seconds = sum(p.b == "x@2" for p in pairs if {p.a, p.b} == {"x@1", "x@2"})
    assert firsts > 10 and seconds > 10


def test_few_votes_get_shown_more_and_close_ratings_meet_more():
    rng = random.Random(2)
    close = {"old@1": 1000, "old@2": 1010, "new@1": 1005}
    pairs = [choose_pair(["old@1", "old@2", "new@1"], {"old@1": 200, "old@2": 200}, close, rng) for _ in range(400)]
    assert sum("new@1" in (p.a, p.b) for p in pairs) > 300
    rated = {"a": 1000, "b": 1010, "far": 1600}
    pairs = [choose_pair(["a", "b", "far"], {}, rated, rng) for _ in range(400)]
    assert sum({p.a, p.b} == {"a", "b"} for p in pairs) > 2 * sum({p.a, p.b} == {"a", "far"} for p in pairs)


def test_two_samples_of_one_version_move_no_rating_but_inform_the_style_effects():
    short, long = "short", "a much longer answer than the other one"
    between = votes_from([("x@1", "base", "a")] * 6 + [("base", "x@1", "a")] * 4)
    same = [  # the shorter sample wins, on either side
        Vote(
            f"s{i}", "s", "p", *((short, long) if i % 2 else (long, short)), "x@1", "x@1", "ab"[i % 2 == 0], seq=100 + i
        )
        for i in range(30)
    ]
    plain, with_same = Ratings().add(between).fit(), Ratings().add(between + same).fit()
    assert {r.contestant: r.bt for r in plain.ratings} == pytest.approx({r.contestant: r.bt for r in with_same.ratings})
    assert [(r.contestant, r.votes, r.wins) for r in plain.ratings] == [
        (r.contestant, r.votes, r.wins) for r in with_same.ratings
    ]
    assert with_same.votes == plain.votes + 30
    assert matches_from_votes(same) == []
    length = {e.feature: e for e in with_same.style}["length"]
    assert length.high < 0, "30 votes for the shorter of two samples of one version must show a length effect"
    assert {e.feature: e for e in plain.style}["length"].low < 0 < {e.feature: e for e in plain.style}["length"].high


def test_win_probability_interval_narrows_with_votes_and_is_wide_but_finite_at_first():
    def estimate(wins: int, losses: int):
        votes = votes_from([("x@2", "x@1", "a")] * wins + [("x@1", "x@2", "a")] * losses)
        return win_probability(HeadToHead.of(votes, "x@2", "x@1"))

    none, one, many = estimate(0, 0), estimate(1, 0), estimate(40, 10)
    assert none.probability == pytest.approx(0.5) and none.low < 0.05 and none.high > 0.95
    assert 0.5 < one.probability and one.low < 0.5 < one.high and one.games == 1
    assert 0.5 < many.low < many.probability < many.high and many.high - many.low < 0.3
    assert estimate(10, 40).high < 0.5
