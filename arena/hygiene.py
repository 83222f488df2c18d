"""Vote hygiene: which stored votes count for the ratings and for training, as in Chatbot Arena, which counts only
anonymous votes, caps each user, rate-limits and runs an outlier test.

`screen` is a pure function of the votes: nothing in the store is changed, so every excluded vote stays stored and
`screen` says why it is left out. A vote gets the reason of the first rule below that applies to it:
- identity leak: an answer names its own model (its adapter NAME or NAME@V, or for the base the names it is served
  and published under, as a whole word in any case), so the round was not anonymous; a name both contestants share
  tells nothing apart.
- rapid-fire: a vote sooner than `min_interval_s` after the same session's previous one, faster than a person can
  read two streamed answers.
- daily cap: a session's votes past `daily_cap` in one UTC day.
- always same side: a session with at least `same_side_min_votes` decisive votes whose split between the A and B
  buttons a fair coin would give with a two-sided p-value below `same_side_alpha`; all its votes.
- outlier: a session with at least `outlier_min_votes` decisive votes on pairs other sessions voted on, that agrees
  with those sessions' head-to-head majority so rarely that both a voter like them and a coin would do so only
  with p below `outlier_alpha`, in all its votes or in those on one contestant's pairs (an attack lifts or sinks
  one contestant; Bonferroni-corrected); all its votes. The consensus gives each other session one voice per pair, so
  volume buys no majority; it leaves out the votes the rules above exclude and the sessions found to be outliers,
  repeated until the outliers found stay the same.
Judge sessions (`judge-...`) vote fast and often by design, so the rapid-fire and daily-cap rules skip them, and
they are kept apart from the outlier test: people are compared with people.

The outlier test takes the larger of two p-values. Against a voter like the others, the session's agreements on a
pair follow the posterior predictive of the others' voices there (a beta-binomial from a uniform prior), so a pair
few others voted on weighs little. Against a coin, a careless voter, who adds noise but no bias, is not excluded.
Screening n votes takes O(n log n) time for a given number of contestants.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterable, Sequence

import numpy as np

from loraflow.arena.judge import JUDGE_SESSION_PREFIX
from loraflow.arena.settings import HygieneSettings
from loraflow.arena.votes import BASE_CONTESTANT, DECISIVE, Vote

IDENTITY_LEAK = "identity leak"
RAPID_FIRE = "rapid-fire"
DAILY_CAP = "over the daily cap"
SAME_SIDE = "always same side"
OUTLIER = "outlier"
RULES = (IDENTITY_LEAK, RAPID_FIRE, DAILY_CAP, SAME_SIDE, OUTLIER)
DAY_S = 86400.0
MAX_CONSENSUS_ROUNDS = 10  # the outlier set settles in two or three rounds; this only bounds a cycle


@dataclass(frozen=True)
class Excluded:
    """A vote left out of the ratings and the training data; it stays stored. `rule` is one of RULES."""

    vote_id: str
    seq: int
    session_id: str
    reason: str
    rule: str


@dataclass(frozen=True)
class Screened:
    """The votes that count, in their given order, and the ones excluded, each with its reason."""

    kept: list[Vote]
    excluded: list[Excluded]

    def counts(self) -> dict[str, int]:
        """Excluded votes per rule, in RULES order, rules that excluded nothing left out."""
        found = Counter(item.rule for item in self.excluded)
        return {rule: found[rule] for rule in RULES if found[rule]}

    def excluded_ids(self) -> set[str]:
        return {item.vote_id for item in self.excluded}


def is_judge(session_id: str) -> bool:
    return session_id.startswith(JUDGE_SESSION_PREFIX)


def model_names(contestant: str, base_names: Sequence[str]) -> set[str]:
    """The names an answer could give its model by: NAME and NAME@V for a version, `base_names` for the base."""
    if contestant == BASE_CONTESTANT:
        # ORG/MODEL is often said without its ORG/
        return {form.lower() for name in base_names if name for form in (name, name.rpartition("/")[2])}
    return {contestant.lower(), contestant.partition("@")[0].lower()}


class LeakFinder:
    """Finds an answer that names its own model; one compiled pattern per pair of contestants."""

    def __init__(self, base_names: Sequence[str]):
        self.base_names = base_names
        self._patterns: dict[tuple[str, str], re.Pattern | None] = {}

    def _pattern(self, own: str, other: str) -> re.Pattern | None:
        key = (own, other)
        if key not in self._patterns:
            # A name the other contestant shares (pirate in pirate@1 vs pirate@2) does not tell the two apart.
            names = model_names(own, self.base_names) - model_names(other, self.base_names)
            alternatives = "|".join(map(re.escape, sorted(names, key=len, reverse=True)))
            self._patterns[key] = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE) if names else None
        return self._patterns[key]

    def leak(self, vote: Vote) -> str | None:
        """Which answer names its model, and the name it used; None for an anonymous round."""
        sides = (("A", vote.answer_a, vote.contestant_a, vote.contestant_b),)
        sides += (("B", vote.answer_b, vote.contestant_b, vote.contestant_a),)
        for side, answer, own, other in sides:
            pattern = self._pattern(own, other)
            found = pattern.search(answer) if pattern else None
            if found:
                return f"answer {side} names its model {own} ({found.group(0)!r})"
        return None


def binomial_lower_tail(successes: int, trials: int, probability: float) -> float:
    """P(X <= successes) for X ~ Binomial(trials, probability), summed in log space so tiny tails stay exact."""
    log_p, log_q = math.log(probability), math.log1p(-probability)
    head = math.lgamma(trials + 1)
    terms = [
        head - math.lgamma(k + 1) - math.lgamma(trials - k + 1) + k * log_p + (trials - k) * log_q
        for k in range(successes + 1)
    ]
    top = max(terms)
    return min(1.0, math.exp(top) * math.fsum(math.exp(term - top) for term in terms))


def beta_binomial_pmf(trials: int, alpha: float, beta: float) -> np.ndarray:
    """P(K = k), k = 0..trials, for K ~ BetaBinomial(trials, alpha, beta), from the ratio of neighbouring terms."""
    k = np.arange(trials, dtype=float)
    log_first = math.lgamma(trials + beta) + math.lgamma(alpha + beta) - math.lgamma(beta)
    log_first -= math.lgamma(trials + alpha + beta)
    log_ratio = np.log((trials - k) / (k + 1)) + np.log((k + alpha) / (trials - k - 1 + beta))
    return np.exp(log_first + np.concatenate([[0.0], np.cumsum(log_ratio)]))


def sum_lower_tail(pmfs: Sequence[np.ndarray], at_most: int) -> float:
    """P(sum <= at_most) for independent counts with these pmfs: their convolution by FFT, O(n log n)."""
    size = sum(len(pmf) - 1 for pmf in pmfs) + 1
    spectrum = np.ones(size // 2 + 1, dtype=complex)
    for pmf in pmfs:
        spectrum *= np.fft.rfft(pmf, size)
    distribution = np.fft.irfft(spectrum, size)
    return float(np.clip(distribution[: at_most + 1].sum(), 0.0, 1.0))


def p_text(p: float) -> str:
    return f"p = {p:.2g}" if p >= 1e-9 else "p < 1e-9"  # below that the FFT's rounding shows; no decision turns on it


def _pair_and_first_won(vote: Vote) -> tuple[tuple[str, str], bool]:
    """The pair in alphabetical order, and whether its first contestant won this decisive vote."""
    if vote.contestant_a < vote.contestant_b:
        return (vote.contestant_a, vote.contestant_b), vote.outcome == "a"
    return (vote.contestant_b, vote.contestant_a), vote.outcome == "b"


def _pace_and_cap(votes: Sequence[Vote], settings: HygieneSettings) -> dict[int, tuple[str, str]]:
    """Rapid-fire and daily-cap exclusions, by position in `votes`, for sessions that are not judges."""
    by_session: dict[str, list[int]] = defaultdict(list)
    for position, vote in enumerate(votes):
        if not is_judge(vote.session_id):
            by_session[vote.session_id].append(position)
    found: dict[int, tuple[str, str]] = {}
    for positions in by_session.values():
        positions.sort(key=lambda i: (votes[i].created, votes[i].seq))
        per_day: Counter[int] = Counter()
        previous: float | None = None
        for position in positions:
            created = votes[position].created
            day = math.floor(created / DAY_S)
            per_day[day] += 1  # every vote cast counts toward the cap, excluded or not
            if previous is not None and created - previous < settings.min_interval_s:
                reason = f"{created - previous:.2f} s after this session's previous vote (minimum "
                found[position] = (RAPID_FIRE, reason + f"{settings.min_interval_s:g} s)")
            elif per_day[day] > settings.daily_cap:
                date = datetime.fromtimestamp(day * DAY_S, timezone.utc).date().isoformat()
                reason = f"vote {per_day[day]} of this session on {date} UTC (cap {settings.daily_cap})"
                found[position] = (DAILY_CAP, reason)
            previous = created
    return found


def _same_side(votes: Sequence[Vote], settings: HygieneSettings) -> dict[str, str]:
    """The sessions whose decisive votes lean to one button beyond a fair coin, with the reason."""
    sides: dict[str, Counter[str]] = defaultdict(Counter)
    for vote in votes:
        if vote.outcome in DECISIVE:
            sides[vote.session_id][vote.outcome] += 1
    found = {}
    for session_id, count in sides.items():
        trials = count["a"] + count["b"]
        if trials < settings.same_side_min_votes:
            continue
        p = min(1.0, 2 * binomial_lower_tail(min(count["a"], count["b"]), trials, 0.5))
        if p < settings.same_side_alpha:
            side = "A" if count["a"] >= count["b"] else "B"
            majority = max(count["a"], count["b"])
            found[session_id] = (
                f"{majority} of {trials} decisive votes for {side} "
                f"({p_text(p)} under a fair coin; alpha {settings.same_side_alpha:g})"
            )
    return found


@dataclass(frozen=True)
class _Agreement:
    """A session's votes on one pair as the outlier test sees them: agreements with the others' majority, votes,
    the agreements a voter like the others would expect, and their distribution."""

    agreements: int
    votes: int
    expected: float
    pmf: np.ndarray


Tally = dict[str, dict[tuple[str, str], list[int]]]  # per session and pair: [first contestant's wins, decisive votes]


def _tally(votes: Iterable[Vote]) -> Tally:
    found: Tally = defaultdict(dict)
    for vote in votes:
        pair, first_won = _pair_and_first_won(vote)
        cell = found[vote.session_id].setdefault(pair, [0, 0])
        cell[0] += first_won
        cell[1] += 1
    return found


def _agreements(
    own: dict[tuple[str, str], list[int]],
    own_voice: dict[tuple[str, str], list[int]],
    consensus: dict[tuple[str, str], list[float]],
) -> dict[tuple[str, str], _Agreement]:
    """A session's agreement with the other sessions' majority, per pair that has one.

    `consensus[pair]` is [the first contestant's share of wins summed over sessions, sessions]; the session's own
    voice there (its `own_voice` cell) is taken out, so it is compared with the others alone."""
    found = {}
    for pair, (first_wins, trials) in own.items():
        share_sum, sessions = consensus.get(pair, (0.0, 0))
        if pair in own_voice:
            inside_wins, inside = own_voice[pair]
            share_sum, sessions = share_sum - inside_wins / inside, sessions - 1
        others_first, others_second = share_sum, sessions - share_sum
        if abs(others_first - others_second) < 1e-9:  # no other session, or an even split: no majority to agree with
            continue
        agreements = first_wins if others_first > others_second else trials - first_wins
        alpha = max(others_first, others_second) + 1.0  # the others' voices on a uniform prior
        beta = min(others_first, others_second) + 1.0
        found[pair] = _Agreement(
            agreements, trials, trials * alpha / (alpha + beta), beta_binomial_pmf(trials, alpha, beta)
        )
    return found


def _outlier_reason(pairs: dict[tuple[str, str], _Agreement], settings: HygieneSettings) -> str | None:
    """Why a session is an outlier, or None. Its votes are tested all together and, as an attack lifts or sinks one
    contestant, on each contestant's pairs alone, with a Bonferroni correction for the number of tests."""
    groups: dict[frozenset, str] = {frozenset(pairs): ""}
    for contestant in sorted({name for pair in pairs for name in pair}):
        groups.setdefault(frozenset(p for p in pairs if contestant in p), f"on the pairs with {contestant}, ")
    tested = []
    for members, label in groups.items():
        measured = [pairs[pair] for pair in sorted(members)]
        votes, agreements = sum(m.votes for m in measured), sum(m.agreements for m in measured)
        if votes >= settings.outlier_min_votes:
            tested.append((label, measured, votes, agreements))
    best = None
    for label, measured, votes, agreements in tested:
        # Agreeing as often as a coin would, or more, is never disagreement beyond chance.
        if agreements >= votes / 2:
            continue
        p_coin = binomial_lower_tail(agreements, votes, 0.5)
        if p_coin * len(tested) >= settings.outlier_alpha:
            continue
        p = min(1.0, len(tested) * max(p_coin, sum_lower_tail([m.pmf for m in measured], agreements)))
        if p < settings.outlier_alpha and (best is None or p < best[0]):
            expected = sum(m.expected for m in measured)
            reason = (
                f"{label}agrees with the other sessions' majority in {agreements} of {votes} decisive votes, where a "
                f"voter like them would in {expected:.1f} and a coin in {votes / 2:g} "
                f"({p_text(p)} over {len(tested)} test(s); alpha {settings.outlier_alpha:g})"
            )
            best = (p, reason)
    return best[1] if best else None


def _outliers(contested: Sequence[Vote], consensus_votes: Sequence[Vote], settings: HygieneSettings) -> dict[str, str]:
    """The sessions that disagree with everyone else's consensus far beyond chance, with the reason.

    `contested` are all decisive votes between two different contestants; `consensus_votes` those of them the other
    rules keep. Each session has one voice per pair in the consensus, its share of wins there, so volume buys no
    majority. Outliers found are taken out of the consensus and every session is tested again."""
    own = _tally(contested)
    voices = _tally(consensus_votes)
    found: dict[str, str] = {}
    for _ in range(MAX_CONSENSUS_ROUNDS):
        consensus: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
        for session_id, cells in voices.items():
            if session_id not in found:
                for pair, (first_wins, trials) in cells.items():
                    consensus[pair][0] += first_wins / trials
                    consensus[pair][1] += 1
        now: dict[str, str] = {}
        for session_id in sorted(own):
            own_voice = {} if session_id in found else voices.get(session_id, {})  # only a voice that is in it
            reason = _outlier_reason(_agreements(own[session_id], own_voice, consensus), settings)
            if reason:
                now[session_id] = reason
        if now.keys() == found.keys():
            return now
        found = now
    return found


def screen(votes: Sequence[Vote], settings: HygieneSettings | None = None, base_names: Sequence[str] = ()) -> Screened:
    """The votes that count and the ones excluded, each with its rule and reason (see the module docstring).

    Pass every stored vote, not a recent slice: the caps, the pace and the tests per session read a session's whole
    history. `base_names` are the names the base goes by (its served name, its hub id), for the identity-leak rule."""
    settings = settings or HygieneSettings()
    finder = LeakFinder(tuple(base_names))
    reasons: dict[int, tuple[str, str]] = {}
    for position, vote in enumerate(votes):
        leak = finder.leak(vote)
        if leak:
            reasons[position] = (IDENTITY_LEAK, leak)
    for position, found in _pace_and_cap(votes, settings).items():
        reasons.setdefault(position, found)
    one_sided = _same_side(votes, settings)
    # People are tested against people: a judge's votes neither make the consensus nor are tested against it.
    contested = [
        (i, v)
        for i, v in enumerate(votes)
        if v.outcome in DECISIVE and not v.same_contestant and not is_judge(v.session_id)
    ]
    consensus_votes = [v for i, v in contested if i not in reasons and v.session_id not in one_sided]
    outliers = _outliers([v for _, v in contested], consensus_votes, settings)
    kept, excluded = [], []
    for position, vote in enumerate(votes):
        rule_and_reason = reasons.get(position)
        if rule_and_reason is None and vote.session_id in one_sided:
            rule_and_reason = (SAME_SIDE, one_sided[vote.session_id])
        if rule_and_reason is None and vote.session_id in outliers:
            rule_and_reason = (OUTLIER, outliers[vote.session_id])
        if rule_and_reason is None:
            kept.append(vote)
            continue
        rule, detail = rule_and_reason
        excluded.append(Excluded(vote.vote_id, vote.seq, vote.session_id, f"{rule}: {detail}", rule))
    return Screened(kept, excluded)
