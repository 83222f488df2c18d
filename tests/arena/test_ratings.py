"""Ratings math on constructed vote sets, and the matchmaking policy."""

from __future__ import annotations

import random

from loraflow.arena.matchmaking import choose_pair
from loraflow.arena.ratings import Match, bradley_terry, elo_history, leaderboard, online_elo, plot_elo_history
from loraflow.arena.votes import Vote


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
    rows = leaderboard(constructed_votes(), bootstrap_rounds=100)
    assert [r.contestant for r in rows] == ["strong", "mid", "weak"]
    for row in rows:
        assert row.bt_low <= row.bt <= row.bt_high
        assert row.votes == 200 and row.wins + row.losses + row.draws == 200
    assert rows[0].bt_low > rows[2].bt_high  # separated beyond doubt
    assert rows[0].elo > rows[1].elo > rows[2].elo


def test_bradley_terry_recovers_known_odds():
    # 3:1 odds means 400 * log10(3) = 191 Elo points apart.
    matches = [Match("a", "b", 1.0)] * 300 + [Match("a", "b", 0.0)] * 100
    ratings = bradley_terry(matches, prior=0.0)
    assert abs((ratings["a"] - ratings["b"]) - 190.8) < 1.0


def test_draws_and_both_bad_count_as_half():
    drawn = votes_from([("a", "b", "tie"), ("a", "b", "both_bad")] * 10)
    rows = {r.contestant: r for r in leaderboard(drawn, bootstrap_rounds=20)}
    assert abs(rows["a"].bt - rows["b"].bt) < 1e-6
    assert rows["a"].draws == 20 and rows["a"].wins == 0


def test_undefeated_contestant_gets_a_finite_rating():
    ratings = bradley_terry([Match("a", "b", 1.0)] * 5)
    assert ratings["a"] > ratings["b"] and ratings["a"] < 2000


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
    pairs = [choose_pair(["base", "x@1", "x@2"], [], {}, rng) for _ in range(300)]
    assert all(p.a != p.b for p in pairs)
    assert 100 < sum("base" in (p.a, p.b) for p in pairs) < 300
    firsts = sum(p.a == "x@2" for p in pairs if {p.a, p.b} == {"x@1", "x@2"})
    seconds = sum(p.b == "x@2" for p in pairs if {p.a, p.b} == {"x@1", "x@2"})
    assert firsts > 10 and seconds > 10


def test_new_version_is_paired_with_its_parent_until_it_has_enough_votes():
    rng = random.Random(1)
    contestants = ["base", "x@1", "x@2"]
    pairs = [choose_pair(contestants, [], {}, rng, focus=("x@2", "x@1"), focus_votes=5) for _ in range(20)]
    assert all({p.a, p.b} == {"x@1", "x@2"} for p in pairs)
    done = votes_from([("x@2", "x@1", "a")] * 5)
    later = [choose_pair(contestants, done, {}, rng, focus=("x@2", "x@1"), focus_votes=5) for _ in range(60)]
    assert any("base" in (p.a, p.b) for p in later)


def test_few_votes_get_shown_more_and_close_ratings_meet_more():
    rng = random.Random(2)
    seasoned = votes_from([("old@1", "old@2", "a")] * 200)
    close = {"old@1": 1000, "old@2": 1010, "new@1": 1005}
    pairs = [choose_pair(["old@1", "old@2", "new@1"], seasoned, close, rng) for _ in range(400)]
    assert sum("new@1" in (p.a, p.b) for p in pairs) > 300
    rated = {"a": 1000, "b": 1010, "far": 1600}
    pairs = [choose_pair(["a", "b", "far"], [], rated, rng) for _ in range(400)]
    assert sum({p.a, p.b} == {"a", "b"} for p in pairs) > 2 * sum({p.a, p.b} == {"a", "far"} for p in pairs)
