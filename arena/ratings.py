"""Ratings from votes: online Elo, Bradley-Terry with bootstrap confidence intervals, and their history.

Ties and both-bad votes count as a draw (half a win each), as in Chatbot Arena's analysis.
Bradley-Terry is fitted with Hunter's MM algorithm and reported on the Elo scale (400 points = 10:1 odds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from loraflow.arena.votes import Vote

ELO_START = 1000.0
ELO_K = 32.0
SCALE = 400.0 / math.log(10)


@dataclass(frozen=True)
class Match:
    a: str
    b: str
    score_a: float  # 1 when A won, 0 when B won, 0.5 for a draw
    seq: int = 0


@dataclass(frozen=True)
class Rating:
    contestant: str
    elo: float
    bt: float
    bt_low: float
    bt_high: float
    votes: int
    wins: int
    losses: int
    draws: int


def matches_from_votes(votes: Sequence[Vote]) -> list[Match]:
    score = {"a": 1.0, "b": 0.0, "tie": 0.5, "both_bad": 0.5}
    return [Match(v.contestant_a, v.contestant_b, score[v.outcome], v.seq) for v in votes]


def online_elo(matches: Sequence[Match], k: float = ELO_K) -> dict[str, float]:
    return elo_history(matches, k)[-1][1] if matches else {}


def elo_history(matches: Sequence[Match], k: float = ELO_K) -> list[tuple[int, dict[str, float]]]:
    """Every contestant's Elo after each match, in vote order: the data behind the plot."""
    ratings: dict[str, float] = {}
    history = []
    for match in matches:
        ra = ratings.setdefault(match.a, ELO_START)
        rb = ratings.setdefault(match.b, ELO_START)
        expected_a = 1.0 / (1.0 + 10 ** ((rb - ra) / 400.0))
        ratings[match.a] = ra + k * (match.score_a - expected_a)
        ratings[match.b] = rb - k * (match.score_a - expected_a)
        history.append((match.seq, dict(ratings)))
    return history


def _encode(matches: Sequence[Match]) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    names = sorted({m.a for m in matches} | {m.b for m in matches})
    index = {name: i for i, name in enumerate(names)}
    first = np.array([index[m.a] for m in matches], dtype=int)
    second = np.array([index[m.b] for m in matches], dtype=int)
    return names, first, second, np.array([m.score_a for m in matches], dtype=float)


def _fit_bt(
    n: int, first: np.ndarray, second: np.ndarray, score: np.ndarray, iterations: int, prior: float
) -> np.ndarray:
    """Hunter's MM updates; returns log-strengths centred on zero."""
    wins = np.full(n, prior)
    np.add.at(wins, first, score)
    np.add.at(wins, second, 1.0 - score)
    games = np.zeros((n, n))
    np.add.at(games, (first, second), 1.0)
    games += games.T
    strength = np.ones(n)
    for _ in range(iterations):
        denominator = (games / (strength[:, None] + strength[None, :])).sum(axis=1) + 2 * prior / (strength + 1.0)
        updated = np.maximum(wins / denominator, 1e-12)
        converged = np.allclose(updated, strength, rtol=1e-9, atol=0)
        strength = updated
        if converged:
            break
    log_strength = np.log(strength)
    return log_strength - log_strength.mean()


def bradley_terry(matches: Sequence[Match], iterations: int = 200, prior: float = 0.5) -> dict[str, float]:
    """Maximum-likelihood strengths on the Elo scale, mean 1000. `prior` adds a draw against a virtual average
    player for each contestant, so one that never lost still gets a finite rating."""
    if not matches:
        return {}
    names, first, second, score = _encode(matches)
    fitted = _fit_bt(len(names), first, second, score, iterations, prior)
    return {name: ELO_START + SCALE * float(fitted[i]) for i, name in enumerate(names)}


def bootstrap_bt(
    matches: Sequence[Match], rounds: int = 200, seed: int = 0, level: float = 0.95
) -> dict[str, tuple[float, float]]:
    """Percentile intervals of the Bradley-Terry rating over resamples of the matches."""
    if not matches:
        return {}
    names, first, second, score = _encode(matches)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(rounds):
        picked = rng.integers(0, len(matches), len(matches))
        # A contestant missing from a resample has no rating in it; its interval comes from the others.
        present = np.zeros(len(names), dtype=bool)
        present[first[picked]] = present[second[picked]] = True
        fitted = ELO_START + SCALE * _fit_bt(len(names), first[picked], second[picked], score[picked], 200, 0.5)
        samples.append(np.where(present, fitted, np.nan))
    stacked = np.array(samples)
    tail = (1.0 - level) / 2 * 100
    low, high = np.nanpercentile(stacked, tail, axis=0), np.nanpercentile(stacked, 100 - tail, axis=0)
    return {name: (float(low[i]), float(high[i])) for i, name in enumerate(names)}


def leaderboard(votes: Sequence[Vote], bootstrap_rounds: int = 200, seed: int = 0) -> list[Rating]:
    """One row per contestant, best Bradley-Terry rating first."""
    matches = matches_from_votes(votes)
    elo = online_elo(matches)
    bt = bradley_terry(matches)
    intervals = bootstrap_bt(matches, bootstrap_rounds, seed)
    tallies: dict[str, list[int]] = {name: [0, 0, 0] for name in bt}
    for match in matches:
        if match.score_a == 0.5:
            tallies[match.a][2] += 1
            tallies[match.b][2] += 1
        else:
            winner, loser = (match.a, match.b) if match.score_a == 1.0 else (match.b, match.a)
            tallies[winner][0] += 1
            tallies[loser][1] += 1
    rows = []
    for name in bt:
        low, high = intervals.get(name, (bt[name], bt[name]))
        won, lost, drawn = tallies[name]
        # A resample can miss a contestant's strongest votes; keep the point estimate inside its own interval.
        low, high = min(low, bt[name]), max(high, bt[name])
        rows.append(Rating(name, elo[name], bt[name], low, high, won + lost + drawn, won, lost, drawn))
    return sorted(rows, key=lambda row: row.bt, reverse=True)


def plot_elo_history(votes: Sequence[Vote], path: str | Path | None = None, title: str = "Elo per version over votes"):
    """A matplotlib figure of each contestant's Elo after every vote; saved as PNG when `path` is given."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    history = elo_history(matches_from_votes(votes))
    figure = Figure(figsize=(7, 3.5), dpi=100)
    axes = figure.add_subplot()
    names = sorted({name for _, ratings in history for name in ratings})
    for name in names:
        points = [(number, ratings[name]) for number, (_, ratings) in enumerate(history, 1) if name in ratings]
        points.insert(0, (points[0][0] - 1, ELO_START))  # every contestant enters at the starting rating
        axes.plot([p[0] for p in points], [p[1] for p in points], label=name, marker="." if len(points) < 30 else None)
    axes.set_xlabel("votes")
    axes.set_ylabel("Elo")
    axes.set_title(title)
    if names:
        axes.legend(loc="best", fontsize="small")
    figure.tight_layout()
    if path is not None:
        figure.savefig(path)
    return figure
