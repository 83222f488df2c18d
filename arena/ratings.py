"""Ratings from votes: online Elo, Bradley-Terry with and without style control, their intervals and history.

Ties and both-bad votes count as a draw (half a win each), as in Chatbot Arena's analysis. Bradley-Terry is a
logistic regression on contestant indicators, fitted by Newton's method and reported on the Elo scale (400 points
= 10:1 odds). The style-controlled fit adds Chatbot Arena's style covariates: for answer length and the markdown
header, list item and bold counts, the normalized difference (a - b) / (a + b), standardized over the votes.

Intervals come from the curvature of the fitted log-posterior (a Laplace approximation), not from a bootstrap:
a bootstrap of one vote resamples that vote every time and shows a zero-width interval. Each contestant also
plays a prior draw against a virtual average player, so a handful of votes gives a wide, finite interval.

`Ratings` keeps what the fits need and takes new votes only. People's votes and judges' votes (AI feedback, cast
under `judge-...` sessions) are rated apart: `LeaderboardFit` keeps one `Ratings` per voter group (HUMAN, AI, and ALL
of them together), so a judge's votes never move the people's board. `LiveLeaderboard` runs that fit in a process
of its own, so a page that shows the leaderboard reads the last fit and never computes one, and a refit never holds
the interpreter lock of the process that serves the arena.
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from pathlib import Path
from statistics import NormalDist
from typing import Callable, Sequence

import numpy as np

from loraflow.arena.hygiene import RULES, is_judge, screen
from loraflow.arena.settings import AI, ALL, VOTERS, HygieneSettings, check_voters
from loraflow.arena.votes import HeadToHead, Vote
from loraflow.hub.errors import LoraflowError

ELO_START = 1000.0
ELO_K = 32.0
SCALE = 400.0 / math.log(10)
LEVEL = 0.95
PRIOR = 0.5  # one virtual draw per contestant, as half a win and half a loss
STYLE_PRECISION = 1.0  # a N(0, 1) prior on each style coefficient (logits per standard deviation)
STYLE_FEATURES = ("length", "headers", "list items", "bold")
SCORES = {"a": 1.0, "b": 0.0, "tie": 0.5, "both_bad": 0.5}
# The background refit waits this many times its own duration before the next: while votes stream in, it uses at
# most a tenth of one core, which on a CPU-only server is taken from generation.
REFIT_REST = 9
PLOT_POINTS = 500  # per contestant; keeps drawing the plot constant work however many votes there are

HEADER = re.compile(r"^ {0,3}#{1,6}\s", re.MULTILINE)
LIST_ITEM = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s", re.MULTILINE)
BOLD = re.compile(r"\*\*[^*\n]+\*\*|__[^_\n]+__")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Match:
    a: str
    b: str
    score_a: float  # 1 when A won, 0 when B won, 0.5 for a draw
    seq: int = 0


@dataclass(frozen=True)
class Rating:
    """One contestant's row: Bradley-Terry raw and style-controlled, each with its 95% interval."""

    contestant: str
    elo: float
    bt: float
    bt_low: float
    bt_high: float
    style_bt: float
    style_low: float
    style_high: float
    votes: int
    wins: int
    losses: int
    draws: int


@dataclass(frozen=True)
class StyleEffect:
    """How much one standard deviation of a style covariate is worth, in Elo points, with its 95% interval."""

    feature: str
    elo: float
    low: float
    high: float


@dataclass(frozen=True)
class Board:
    """One finished fit: what the leaderboard shows. `last_seq` is the newest vote it includes."""

    ratings: tuple[Rating, ...] = ()
    style: tuple[StyleEffect, ...] = ()
    votes: int = 0
    last_seq: int = 0
    elo_series: dict[str, tuple[tuple[int, ...], tuple[float, ...]]] = field(default_factory=dict)
    excluded: dict[str, int] = field(default_factory=dict)  # votes vote hygiene left out, per rule
    voters: str = ALL  # whose votes it counts: one of VOTERS


def matches_from_votes(votes: Sequence[Vote]) -> list[Match]:
    """The votes between two different contestants: two samples of one version say nothing about its rating."""
    return [Match(v.contestant_a, v.contestant_b, SCORES[v.outcome], v.seq) for v in votes if not v.same_contestant]


def online_elo(matches: Sequence[Match], k: float = ELO_K) -> dict[str, float]:
    return elo_history(matches, k)[-1][1] if matches else {}


def _elo_step(ratings: dict[str, float], match: Match, k: float) -> None:
    ra = ratings.setdefault(match.a, ELO_START)
    rb = ratings.setdefault(match.b, ELO_START)
    expected_a = 1.0 / (1.0 + 10 ** ((rb - ra) / 400.0))
    ratings[match.a] = ra + k * (match.score_a - expected_a)
    ratings[match.b] = rb - k * (match.score_a - expected_a)


def elo_history(matches: Sequence[Match], k: float = ELO_K) -> list[tuple[int, dict[str, float]]]:
    """Every contestant's Elo after each match, in vote order."""
    ratings: dict[str, float] = {}
    history = []
    for match in matches:
        _elo_step(ratings, match, k)
        history.append((match.seq, dict(ratings)))
    return history


def style_counts(answer: str) -> tuple[int, int, int, int]:
    """Length in characters, markdown headers, list items and bold spans of one answer."""
    return len(answer), len(HEADER.findall(answer)), len(LIST_ITEM.findall(answer)), len(BOLD.findall(answer))


def style_difference(answer_a: str, answer_b: str) -> tuple[float, ...]:
    """(a - b) / (a + b) per style feature; 0 where neither answer has any."""
    pairs = zip(style_counts(answer_a), style_counts(answer_b))
    return tuple((a - b) / (a + b) if a + b else 0.0 for a, b in pairs)


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


@dataclass(frozen=True)
class _Fit:
    params: np.ndarray  # contestant log-strengths, then style coefficients
    covariance: np.ndarray


def _fit_logistic(
    n: int,
    first: np.ndarray,
    second: np.ndarray,
    score: np.ndarray,
    games: np.ndarray,
    features: np.ndarray,
    prior: float,
    start: np.ndarray | None = None,
) -> _Fit:
    """Maximum a posteriori Bradley-Terry by Newton's method, with the inverse Hessian as the covariance.

    Row r is `games[r]` games of `first[r]` against `second[r]` scoring `score[r]` in total, with style covariates
    `features[r]`. Each contestant plays `2 * prior` virtual games against a player at 0 scoring half of them;
    each style coefficient has a N(0, 1 / STYLE_PRECISION) prior."""
    d = features.shape[1]
    size = n + d
    params = np.zeros(size) if start is None else start.astype(float).copy()
    pseudo_games, pseudo_score = 2.0 * prior, prior
    # Without a prior only differences are identified; pin the mean at 0, which the likelihood ignores.
    gauge = 1.0 if prior == 0 else 0.0

    def objective(p: np.ndarray) -> float:
        theta, gamma = p[:n], p[n:]
        eta = theta[first] - theta[second] + features @ gamma
        value = score @ _log_sigmoid(eta) + (games - score) @ _log_sigmoid(-eta)
        value += pseudo_score * (_log_sigmoid(theta).sum() + _log_sigmoid(-theta).sum())
        return value - 0.5 * STYLE_PRECISION * gamma @ gamma - 0.5 * gauge * theta.sum() ** 2

    pair = first * n + second  # the cell of the (A, B) block of the Hessian

    def by_contestant(values: np.ndarray) -> np.ndarray:
        """Each contestant's sum of `values` over its rows, added as A and subtracted as B."""
        return np.bincount(first, values, n) - np.bincount(second, values, n)

    def gradient_and_hessian(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        theta, gamma = p[:n], p[n:]
        eta = theta[first] - theta[second] + features @ gamma
        probability = 1.0 / (1.0 + np.exp(-eta))
        residual = score - games * probability
        weight = games * probability * (1.0 - probability)
        gradient = np.concatenate([by_contestant(residual), features.T @ residual - STYLE_PRECISION * gamma])
        hessian = np.zeros((size, size))
        between = np.bincount(pair, weight, n * n).reshape(n, n)
        hessian[:n, :n] = np.diag(between.sum(axis=0) + between.sum(axis=1)) - between - between.T
        weighted = features * weight[:, None]
        cross = np.stack([by_contestant(column) for column in weighted.T], axis=1) if d else np.zeros((n, 0))
        hessian[:n, n:] = cross
        hessian[n:, :n] = cross.T
        hessian[n:, n:] = features.T @ weighted + STYLE_PRECISION * np.eye(d)
        virtual = 1.0 / (1.0 + np.exp(-theta))
        gradient[:n] += pseudo_score - pseudo_games * virtual - gauge * theta.sum()
        hessian[:n, :n] += np.diag(pseudo_games * virtual * (1.0 - virtual)) + gauge
        return gradient, hessian

    current = objective(params)
    for _ in range(100):
        gradient, hessian = gradient_and_hessian(params)
        step = np.linalg.solve(hessian, gradient)
        scale = 1.0
        while True:  # Newton can overshoot far from the optimum; halve the step until it improves
            trial = params + scale * step
            value = objective(trial)
            if value >= current - 1e-12 or scale < 1e-6:
                break
            scale /= 2
        params, current = trial, value
        if np.max(np.abs(scale * step)) < 1e-9:
            break
    _, hessian = gradient_and_hessian(params)
    return _Fit(params, np.linalg.inv(hessian))


def _centred(fit: _Fit, n: int, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Elo-scale ratings around a mean of ELO_START and the half-width of their intervals."""
    theta = fit.params[:n]
    contrast = np.eye(n) - 1.0 / n  # rating minus the mean rating
    variance = np.einsum("ij,jk,ik->i", contrast, fit.covariance[:n, :n], contrast)
    z = NormalDist().inv_cdf((1 + level) / 2)
    return ELO_START + SCALE * (theta - theta.mean()), z * SCALE * np.sqrt(np.maximum(variance, 0.0))


def bradley_terry(matches: Sequence[Match], prior: float = PRIOR) -> dict[str, float]:
    """Strengths on the Elo scale, mean 1000. `prior` adds a draw against a virtual average player for each
    contestant (half a win per 0.5), so one that never lost still gets a finite rating."""
    if not matches:
        return {}
    names = sorted({m.a for m in matches} | {m.b for m in matches})
    index = {name: i for i, name in enumerate(names)}
    first = np.array([index[m.a] for m in matches])
    second = np.array([index[m.b] for m in matches])
    score = np.array([m.score_a for m in matches], dtype=float)
    fit = _fit_logistic(len(names), first, second, score, np.ones(len(matches)), np.zeros((len(matches), 0)), prior)
    centre, _ = _centred(fit, len(names), LEVEL)
    return {name: float(centre[i]) for i, name in enumerate(names)}


@dataclass(frozen=True)
class WinProbability:
    """Bradley-Terry's probability that `first` beats `second`, with its interval, from their head-to-head votes."""

    first: str
    second: str
    probability: float
    low: float
    high: float
    games: int  # head-to-head votes, draws included
    level: float = LEVEL


def win_probability(tally: HeadToHead, level: float = LEVEL, prior: float = PRIOR) -> WinProbability:
    """From the votes between the two alone (draws count half); the prior's virtual draws keep the interval wide
    and finite after a handful of votes. Fitted from the counts, so the cost does not grow with the votes."""
    first_index = np.array([0, 1, 0])
    score = np.array([tally.wins, tally.losses, tally.draws / 2], dtype=float)
    games = np.array([tally.wins, tally.losses, tally.draws], dtype=float)
    fit = _fit_logistic(2, first_index, 1 - first_index, score, games, np.zeros((3, 0)), prior)
    difference = fit.params[0] - fit.params[1]
    spread = math.sqrt(max(fit.covariance[0, 0] + fit.covariance[1, 1] - 2 * fit.covariance[0, 1], 0.0))
    z = NormalDist().inv_cdf((1 + level) / 2)

    def sigmoid(x: float) -> float:
        return 1.0 / (1.0 + math.exp(-x))

    return WinProbability(
        tally.first,
        tally.second,
        sigmoid(difference),
        sigmoid(difference - z * spread),
        sigmoid(difference + z * spread),
        tally.games,
        level,
    )


class Ratings:
    """What the fits need, kept up to date one vote at a time: per-pair games and scores for the raw fit, one
    row of style differences per vote for the style-controlled fit, tallies and online Elo. `fit` starts from the
    previous fit, so refitting after a few new votes takes a Newton step or two."""

    def __init__(self, prior: float = PRIOR, level: float = LEVEL):
        self.prior, self.level = prior, level
        self.names: list[str] = []
        self._index: dict[str, int] = {}
        self.last_seq = 0
        self.count = 0
        self._pair_games = np.zeros((0, 0))
        self._pair_score = np.zeros((0, 0))
        self._first = np.zeros(0, dtype=int)
        self._second = np.zeros(0, dtype=int)
        self._score = np.zeros(0)
        self._style = np.zeros((0, len(STYLE_FEATURES)))
        self._tallies: list[list[int]] = []  # wins, losses, draws
        self._elo: dict[str, float] = {}
        self._series: dict[str, tuple[list[int], list[float]]] = {}
        self._raw_theta = np.zeros(0)  # the previous fits, where the next ones start
        self._style_theta = np.zeros(0)
        self._style_gamma = np.zeros(len(STYLE_FEATURES))

    def _contestant(self, name: str) -> int:
        if name not in self._index:
            self._index[name] = len(self.names)
            self.names.append(name)
            self._tallies.append([0, 0, 0])
            self._pair_games = np.pad(self._pair_games, ((0, 1), (0, 1)))
            self._pair_score = np.pad(self._pair_score, ((0, 1), (0, 1)))
            self._raw_theta = np.append(self._raw_theta, 0.0)
            self._style_theta = np.append(self._style_theta, 0.0)
            self._series[name] = ([self.count], [ELO_START])  # every contestant enters at the starting rating
        return self._index[name]

    def add(self, votes: Sequence[Vote]) -> Ratings:
        """Take votes not seen before, in seq order (the caller reads them with `after_seq=self.last_seq`)."""
        first, second, score, style = [], [], [], []
        for vote in votes:
            a, b, s = self._contestant(vote.contestant_a), self._contestant(vote.contestant_b), SCORES[vote.outcome]
            first.append(a)
            second.append(b)
            score.append(s)
            style.append(style_difference(vote.answer_a, vote.answer_b))
            self.last_seq = max(self.last_seq, vote.seq)
            self.count += 1
            if a == b:  # two samples of one version: no rating evidence, but the cleanest evidence about style
                continue
            self._pair_games[a, b] += 1
            self._pair_score[a, b] += s
            if s == 0.5:
                self._tallies[a][2] += 1
                self._tallies[b][2] += 1
            else:
                winner, loser = (a, b) if s == 1.0 else (b, a)
                self._tallies[winner][0] += 1
                self._tallies[loser][1] += 1
            _elo_step(self._elo, Match(vote.contestant_a, vote.contestant_b, s), ELO_K)
            for name in (vote.contestant_a, vote.contestant_b):
                numbers, values = self._series[name]
                numbers.append(self.count)
                values.append(self._elo[name])
        if first:
            self._first = np.concatenate([self._first, first])
            self._second = np.concatenate([self._second, second])
            self._score = np.concatenate([self._score, score])
            self._style = np.concatenate([self._style, np.array(style, dtype=float)])
        return self

    def _fit_raw(self) -> _Fit:
        first, second = np.nonzero(self._pair_games)
        games, score = self._pair_games[first, second], self._pair_score[first, second]
        n = len(self.names)
        return _fit_logistic(n, first, second, score, games, np.zeros((len(games), 0)), self.prior, self._raw_theta)

    def _fit_style(self) -> _Fit:
        spread = self._style.std(axis=0)
        standardized = (self._style - self._style.mean(axis=0)) / np.where(spread > 1e-12, spread, 1.0)
        n = len(self.names)
        start = np.concatenate([self._style_theta, self._style_gamma])
        games = np.ones(len(self._score))
        return _fit_logistic(n, self._first, self._second, self._score, games, standardized, self.prior, start)

    def fit(self) -> Board:
        if not self.names:
            return Board()
        n = len(self.names)
        raw, styled = self._fit_raw(), self._fit_style()
        self._raw_theta, self._style_theta, self._style_gamma = raw.params, styled.params[:n], styled.params[n:]
        bt, bt_width = _centred(raw, n, self.level)
        style_bt, style_width = _centred(styled, n, self.level)
        rows = []
        for i, name in enumerate(self.names):
            won, lost, drawn = self._tallies[i]
            rows.append(
                Rating(
                    name,
                    self._elo.get(name, ELO_START),  # a version seen only against itself has played no match
                    float(bt[i]),
                    float(bt[i] - bt_width[i]),
                    float(bt[i] + bt_width[i]),
                    float(style_bt[i]),
                    float(style_bt[i] - style_width[i]),
                    float(style_bt[i] + style_width[i]),
                    won + lost + drawn,
                    won,
                    lost,
                    drawn,
                )
            )
        z = NormalDist().inv_cdf((1 + self.level) / 2)
        effects = []
        for j, feature in enumerate(STYLE_FEATURES):
            coefficient, spread = styled.params[n + j], math.sqrt(styled.covariance[n + j, n + j])
            low, high = coefficient - z * spread, coefficient + z * spread
            effects.append(StyleEffect(feature, float(SCALE * coefficient), float(SCALE * low), float(SCALE * high)))
        series = self.elo_series()
        ranked = tuple(sorted(rows, key=lambda row: row.bt, reverse=True))
        return Board(ranked, tuple(effects), self.count, self.last_seq, series)

    def elo_series(self) -> dict[str, tuple[tuple[int, ...], tuple[float, ...]]]:
        """Each contestant's online Elo over the votes, thinned to PLOT_POINTS points for plotting."""
        return {name: _thinned(numbers, values) for name, (numbers, values) in self._series.items()}


def _thinned(numbers: list[int], values: list[float]) -> tuple[tuple[int, ...], tuple[float, ...]]:
    stride = max(1, math.ceil(len(numbers) / PLOT_POINTS))
    picked = list(range(0, len(numbers), stride))
    if picked[-1] != len(numbers) - 1:
        picked.append(len(numbers) - 1)
    return tuple(numbers[i] for i in picked), tuple(values[i] for i in picked)


def leaderboard(votes: Sequence[Vote]) -> list[Rating]:
    """One row per contestant, best raw Bradley-Terry rating first: a full fit of `votes`."""
    return list(Ratings().add(votes).fit().ratings)


def counts_for(session_id: str, voters: str) -> bool:
    """Whether a vote cast by `session_id` counts on the `voters` board: people's (HUMAN), judges' (AI) or ALL."""
    return voters == ALL or (voters == AI) == is_judge(session_id)


@dataclass(frozen=True)
class Boards:
    """One finished fit of each voter group's board, from the votes up to `seen_seq`, the newest one read."""

    by_voters: dict[str, Board]
    seen_seq: int = 0

    def __getitem__(self, voters: str) -> Board:
        return self.by_voters[voters]


class LeaderboardFit:
    """The leaderboards of one vote store, kept current in the calling process: `refresh` reads the votes after the
    newest it has seen, screens them (vote hygiene reads each session's whole history, so it screens every vote read
    so far) and refits one `Ratings` per voter group from where its last fit ended. `LiveLeaderboard` runs one in a
    process of its own; `loraflow votes leaderboard` calls one directly."""

    def __init__(
        self,
        read_votes: Callable[..., list[Vote]],
        hygiene: HygieneSettings | None = None,
        base_names: Sequence[str] = (),
        voters: Sequence[str] = VOTERS,
    ):
        self._read_votes = read_votes  # VoteStore.votes: called with after_seq=
        self.hygiene, self.base_names, self.voters = hygiene, tuple(base_names), check_voters(voters)
        self._ratings = {group: Ratings() for group in self.voters}
        self._seen_seq = 0
        self._votes: list[Vote] = []  # with hygiene, every vote read
        self._excluded: set[str] = set()
        self._boards: Boards | None = None

    def refresh(self) -> Boards:
        """Read the new votes and refit the boards they change; without new votes, the last fit."""
        new = self._read_votes(after_seq=self._seen_seq)
        if new or self._boards is None:
            self._seen_seq = max([self._seen_seq, *(v.seq for v in new)])
            self._boards = self._refit(new)
        return self._boards

    def _refit(self, new: list[Vote]) -> Boards:
        kept, rebuilt, excluded_counts = new, False, {group: {} for group in self.voters}
        if self.hygiene is not None:
            self._votes += new
            screened = screen(self._votes, self.hygiene, self.base_names)
            excluded = screened.excluded_ids()
            rebuilt = excluded - {v.vote_id for v in new} != self._excluded  # an earlier vote changed side
            if rebuilt:
                self._ratings = {group: Ratings() for group in self.voters}
                kept = screened.kept
            else:
                kept = [v for v in new if v.vote_id not in excluded]
            self._excluded = excluded
            for group in self.voters:
                found = Counter(item.rule for item in screened.excluded if counts_for(item.session_id, group))
                excluded_counts[group] = {rule: found[rule] for rule in RULES if found[rule]}
        changed = set()
        for group, ratings in self._ratings.items():
            added = [v for v in kept if counts_for(v.session_id, group)]
            ratings.add(added)
            if added or rebuilt or self._boards is None:
                changed.add(group)
        boards: dict[str, Board] = {}
        for group in sorted(self.voters, key=lambda group: group == ALL):  # ALL last: it may equal another board
            ratings = self._ratings[group]
            # While only people (or only judges) voted, everyone's board is theirs: one fit, not two.
            twin = next((g for g in boards if group == ALL and self._ratings[g].count == ratings.count), None)
            if twin is not None:
                board = boards[twin]
            elif group in changed:
                board = ratings.fit()
            else:  # a vote of one group leaves the other's fit as it was; only its hygiene counts can change
                board = self._boards.by_voters[group]
            boards[group] = replace(board, voters=group, excluded=excluded_counts[group])
        return Boards({group: boards[group] for group in self.voters}, self._seen_seq)


REFIT_NICENESS = 10  # the refit process's nice increment: the process serving the arena and the server come first
# A fresh interpreter that imports only this module, whatever script started the arena: multiprocessing's spawn
# would import that script again, and one without a __main__ guard would start a second arena.
LEADERBOARD_PROCESS = (
    "import sys; from loraflow.arena.ratings import leaderboard_process; leaderboard_process(int(sys.argv[1]))"
)


def leaderboard_process(handle: int) -> None:
    """The leaderboard process, on its end of a socket pair: the first message holds the store's URL, the poll
    interval, the hygiene settings, the base's names and the voter groups. It refits after new votes arrive and sends
    each new `Boards` with the number of the newest refresh request it answers (a failed refit sends the error's text
    instead), then rests. A message ends the rest: 0 asks for a refit now, N > 0 for a reply to request N; None stops
    it, as does the arena's process closing its end."""
    if hasattr(os, "nice"):
        os.nice(REFIT_NICENESS)
    from loraflow.arena.votes import VoteStore

    connection = Connection(handle)
    try:
        votes_url, poll_s, hygiene, base_names, voters = connection.recv()
    except EOFError:
        return
    fit = LeaderboardFit(VoteStore(votes_url, rate_limit=None, create=False).votes, hygiene, base_names, voters)
    requested = answered = 0
    sent: Boards | None = None
    while True:
        started = time.perf_counter()
        reply = None
        try:
            boards = fit.refresh()
            if boards is not sent or requested > answered:
                reply, sent = (requested, boards), boards
        except Exception as error:  # a locked or unreachable database: the arena keeps the last fit; try again later
            log.exception("refitting the leaderboard failed; the arena keeps showing the previous ratings")
            reply = (requested, f"{type(error).__name__}: {error}") if requested > answered else None
        try:
            if reply is not None:
                connection.send(reply)
                answered = requested
            if connection.poll(max(poll_s, REFIT_REST * (time.perf_counter() - started))):
                while True:
                    message = connection.recv()
                    if message is None:
                        return
                    requested = max(requested, message)
                    if not connection.poll():
                        break
        except (EOFError, OSError):  # the arena's process is gone
            return


class LiveLeaderboard:
    """The arena's leaderboards, refitted in a separate, lower-priority process, so that refitting (which screens
    every vote) never holds the interpreter lock of the process that serves the arena: a click waits on no refit.
    `latest` returns the last finished fit and never computes; `wake` asks for a refit now instead of at the next
    poll; `refresh` waits for a fit that includes every vote stored before the call."""

    def __init__(
        self,
        votes_url: str,
        poll_s: float = 2.0,
        hygiene: HygieneSettings | None = None,
        base_names: Sequence[str] = (),
        voters: Sequence[str] = VOTERS,
        restart_after_s: float = 30.0,
    ):
        self.votes_url, self.poll_s = votes_url, poll_s
        self.hygiene, self.base_names, self.voters = hygiene, tuple(base_names), check_voters(voters)
        self.restart_after_s = restart_after_s  # a process that exited (killed, out of memory) is started again
        self._started_at = 0.0
        self._boards: Boards | None = None
        self._state = threading.Condition()  # guards what the receiving thread sets: boards, answers, error, gone
        self._requested = self._answered = 0
        self._error: str | None = None
        self._gone = False
        self._closed = False
        self._process: subprocess.Popen | None = None
        self._connection: Connection | None = None
        self._send_lock = threading.Lock()

    def latest(self, voters: str) -> Board | None:
        """The last fit of the `voters` board, or None before the first one finished; starts the process on first
        use."""
        boards = self.latest_boards()
        return boards[voters] if boards is not None else None

    def latest_boards(self) -> Boards | None:
        self._start()
        return self._boards

    def wake(self) -> None:
        self._start()
        self._send(0)

    def refresh(self, timeout_s: float = 600.0) -> Boards:
        """Every voter group's board, fitted from every vote stored before this call: asks the process and waits."""
        self._start()
        with self._state:
            self._requested += 1
            wanted = self._requested
        self._send(wanted)
        with self._state:
            done = self._state.wait_for(lambda: self._answered >= wanted or self._gone, timeout_s)
            if self._answered < wanted:
                reason = "its process exited (its error is above)" if done else f"no fit within {timeout_s:.0f} s"
                raise LoraflowError(f"the leaderboard of {self.votes_url} could not be refitted: {reason}.")
            if self._error is not None:
                raise LoraflowError(f"refitting the leaderboard of {self.votes_url} failed: {self._error}")
            return self._boards

    def close(self) -> None:
        """Stop the process (it stops by itself, too, when this process ends)."""
        with self._send_lock:
            self._closed = True
            process, connection = self._process, self._connection
            if connection is not None:
                try:
                    connection.send(None)
                except OSError:
                    pass
        if process is not None:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if connection is not None:
            connection.close()

    def _start(self) -> None:
        with self._send_lock:
            if self._closed or self._process is not None and not self._gone:
                return
            if self._process is not None:  # it exited: start another, though not more often than restart_after_s
                if time.monotonic() - self._started_at < self.restart_after_s:
                    return
                self._process.wait()
                self._connection.close()
                log.warning("the leaderboard process exited (%s); starting it again", self._process.returncode)
                with self._state:
                    self._gone = False
            self._started_at = time.monotonic()
            ours, theirs = socket.socketpair()
            command = [sys.executable, "-c", LEADERBOARD_PROCESS, str(theirs.fileno())]
            self._process = subprocess.Popen(command, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
            theirs.close()
            self._connection = Connection(ours.detach())
            self._connection.send((self.votes_url, self.poll_s, self.hygiene, self.base_names, self.voters))
            receiving = (self._connection,)
        threading.Thread(target=self._receive, args=receiving, name="leaderboard-receiver", daemon=True).start()

    def _send(self, message: int) -> None:
        with self._send_lock:
            if self._closed or self._connection is None:
                return
            try:
                self._connection.send(message)
            except OSError:  # the process is gone; `refresh` says so
                pass

    def _receive(self, connection: Connection) -> None:
        while True:
            try:
                answered, result = connection.recv()
            except (EOFError, OSError):
                with self._state:
                    self._gone = True
                    self._state.notify_all()
                return
            with self._state:
                if isinstance(result, Boards):
                    self._boards, self._error = result, None
                else:
                    self._error = result
                self._answered = max(self._answered, answered)
                self._state.notify_all()


def plot_elo_series(
    series: dict[str, tuple[Sequence[int], Sequence[float]]],
    path: str | Path | None = None,
    title: str = "Elo per version over votes",
):
    """A matplotlib figure of each contestant's Elo over votes; saved as PNG when `path` is given."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 3.5), dpi=100)
    axes = figure.add_subplot()
    for name in sorted(series):
        numbers, values = series[name]
        marker = "." if len(numbers) < 30 else None
        axes.plot(numbers, values, label=name, marker=marker, drawstyle="steps-post")
    axes.set_xlabel("votes")
    axes.set_ylabel("Elo")
    axes.set_title(title)
    if series:
        axes.legend(loc="best", fontsize="small")
    figure.tight_layout()
    if path is not None:
        figure.savefig(path)
    return figure


def plot_elo_history(votes: Sequence[Vote], path: str | Path | None = None, title: str = "Elo per version over votes"):
    """The plot of `plot_elo_series` for a list of votes."""
    return plot_elo_series(Ratings().add(votes).elo_series(), path, title)
