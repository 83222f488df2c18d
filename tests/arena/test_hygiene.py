"""Vote hygiene: each rule excludes what it should and keeps a normal vote; and adversarial voters mixed among honest
ones steer neither the ratings nor the preference pairs the next version is trained on."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from loraflow.arena.export import preference_pairs
from loraflow.arena.hygiene import (
    DAILY_CAP,
    IDENTITY_LEAK,
    OUTLIER,
    RAPID_FIRE,
    SAME_SIDE,
    beta_binomial_pmf,
    binomial_lower_tail,
    screen,
    sum_lower_tail,
)
from loraflow.arena.judge import judge_session
from loraflow.arena.ratings import Ratings
from loraflow.arena.settings import HygieneSettings
from loraflow.arena.votes import Vote
from loraflow.hub.errors import LoraflowError

DAY = 86400.0
START = 1_699_920_000.0  # midnight UTC, so a test's day boundaries are where it says
TRUTH = {"tutor@3": 1100.0, "tutor@2": 1000.0, "base": 900.0}  # Elo scale: the order the arena should find
WEAKEST = "base"


def vote(
    number: int,
    session: str = "s",
    created: float = START,
    a: str = "tutor@2",
    b: str = "tutor@3",
    outcome: str = "a",
    answer_a: str = "Paris is the capital of France.",
    answer_b: str = "The capital is Paris.",
) -> Vote:
    return Vote(
        f"v{number}", session, "What is the capital of France?", answer_a, answer_b, a, b, outcome, created, number
    )


def reasons(votes: list[Vote], settings: HygieneSettings | None = None, base_names: tuple[str, ...] = ()) -> dict:
    return {item.vote_id: (item.rule, item.reason) for item in screen(votes, settings, base_names).excluded}


def test_identity_leak_excludes_a_round_whose_answer_names_its_own_model():
    served = "HuggingFaceTB/SmolLM2-135M-Instruct"
    votes = [
        vote(1, "s1", answer_a="As tutor@2 I would say Paris."),
        vote(2, "s2", answer_b="I am TUTOR, and it is Paris.", a="base", b="tutor@3"),
        vote(3, "s3", a="base", b="tutor@3", answer_a="I am SmolLM2-135M-Instruct: Paris."),
        vote(4, "s4", answer_a="Tutors agree: Paris."),  # a longer word is not the name
        vote(5, "s5", answer_a="A tutor says Paris."),  # tutor@2 and tutor@3 share the name: it tells nothing apart
        vote(6, "s6", answer_b="As tutor@2 I would say Paris."),  # names the other side's model, not its own
        vote(7, judge_session("pirate", 0), answer_b="tutor@3 here: Paris."),
    ]
    found = reasons(votes, base_names=(served,))
    assert set(found) == {"v1", "v2", "v3", "v7"}
    assert all(rule == IDENTITY_LEAK for rule, _ in found.values())
    assert "answer A names its model tutor@2 ('tutor@2')" in found["v1"][1]
    assert "answer B names its model tutor@3 ('TUTOR')" in found["v2"][1]
    assert "v3" not in reasons(votes)  # without its names the base has none to leak


def test_rapid_fire_excludes_a_vote_faster_than_two_answers_can_be_read():
    votes = [
        vote(1, "person", START),
        vote(2, "person", START + 0.6),
        vote(3, "person", START + 30),
        vote(4, judge_session("pirate", 0), START + 30),
        vote(5, judge_session("pirate", 0), START + 30.1),  # judges vote fast by design
    ]
    found = reasons(votes)
    assert list(found) == ["v2"]
    assert found["v2"] == (RAPID_FIRE, "rapid-fire: 0.60 s after this session's previous vote (minimum 1 s)")


def test_daily_cap_excludes_a_sessions_votes_past_the_cap_in_one_utc_day():
    settings = HygieneSettings(daily_cap=3)
    person = [vote(i, "person", START + 60 * i, outcome="ab"[i % 2]) for i in range(1, 6)]
    judge = [vote(10 + i, judge_session("pirate", 0), START + 60 * i, outcome="ab"[i % 2]) for i in range(5)]
    next_day = vote(20, "person", START + DAY + 1)
    found = reasons(person + judge + [next_day], settings)
    assert set(found) == {"v4", "v5"}
    assert found["v4"] == (DAILY_CAP, "over the daily cap: vote 4 of this session on 2023-11-14 UTC (cap 3)")


def test_always_same_side_excludes_a_session_that_only_presses_one_button():
    always_a = [vote(i, "clicker", START + 60 * i, outcome="a") for i in range(12)]
    too_few = [vote(100 + i, "brief", START + 60 * i, outcome="b") for i in range(11)]
    balanced = [vote(200 + i, "fair", START + 60 * i, outcome="ab"[i % 3 == 0]) for i in range(30)]
    with_ties = [vote(300 + i, "ties", START + 60 * i, outcome=("a", "tie")[i % 2]) for i in range(20)]
    found = reasons(always_a + too_few + balanced + with_ties)
    assert set(found) == {f"v{i}" for i in range(12)}
    rule, reason = found["v0"]
    assert rule == SAME_SIDE and reason.startswith("always same side: 12 of 12 decisive votes for A (p = 0.00049")


def honest_votes(rng: random.Random, sessions: int, first_number: int = 0, days: float = 2.0) -> list[Vote]:
    """People who prefer the truth's stronger contestant: each with their own attention (a share of coin-flip votes),
    10% ties, 8 to 40 votes a session at 15 to 90 s a round, sides shuffled."""
    votes, number, names = [], first_number, sorted(TRUTH)
    for index in range(sessions):
        attention = rng.uniform(0.6, 1.0)
        created = START + rng.uniform(0, days * DAY)
        for _ in range(rng.randint(8, 40)):
            a, b = rng.sample(names, 2)
            if rng.random() < 0.1:
                outcome = "tie"
            elif rng.random() < attention:
                p_a = 1 / (1 + 10 ** ((TRUTH[b] - TRUTH[a]) / 400))
                outcome = "a" if rng.random() < p_a else "b"
            else:
                outcome = rng.choice("ab")
            votes.append(vote(number, f"person-{index}", created, a, b, outcome, f"answer {number} a", f"{number} b"))
            number += 1
            created += rng.uniform(15, 90)
    return votes


def adversary(
    rng: random.Random, session: str, rounds: int, gap_s: tuple[float, float], choose, first_number: int
) -> list[Vote]:
    """One session that votes `choose(a, b)` ('a' or 'b') on random pairs, sides shuffled, `gap_s` apart."""
    votes, created, names = [], START + rng.uniform(0, DAY / 2), sorted(TRUTH)
    for number in range(first_number, first_number + rounds):
        a, b = rng.sample(names, 2)
        votes.append(vote(number, session, created, a, b, choose(a, b), f"answer {number} a", f"{number} b"))
        created += rng.uniform(*gap_s)
    return votes


def for_the_weaker(a: str, b: str) -> str:
    return "a" if TRUTH[a] < TRUTH[b] else "b"


def weakest_wins(a: str, b: str, rng: random.Random) -> str:
    """Votes for the weakest whenever it plays, honestly otherwise: the attack that lifts one contestant."""
    if WEAKEST in (a, b):
        return "a" if a == WEAKEST else "b"
    return "a" if rng.random() < 1 / (1 + 10 ** ((TRUTH[b] - TRUTH[a]) / 400)) else "b"


def in_seq_order(votes: list[Vote]) -> list[Vote]:
    ordered = sorted(votes, key=lambda v: v.created)
    return [replace(v, seq=i + 1) for i, v in enumerate(ordered)]


def ratings_of(votes: list[Vote]) -> dict[str, float]:
    return {row.contestant: row.bt for row in Ratings().add(votes).fit().ratings}


def test_outlier_test_excludes_a_human_paced_voter_against_the_consensus_and_keeps_noisy_honest_ones():
    rng = random.Random(1)
    honest = honest_votes(rng, 40)
    contrarian = adversary(rng, "contrarian", 40, (20, 60), for_the_weaker, 10_000)
    coin = adversary(rng, "coin", 40, (20, 60), lambda a, b: rng.choice("ab"), 20_000)  # honest but careless
    screened = screen(in_seq_order(honest + contrarian + coin))
    found = {item.session_id: item for item in screened.excluded}
    assert set(found) == {"contrarian"}
    assert found["contrarian"].rule == OUTLIER
    assert (
        "agrees with the other sessions' majority in 0 of 40 decisive votes, where a voter like them would in"
        in found["contrarian"].reason
    )
    assert screened.counts() == {OUTLIER: 40}


def test_outlier_test_needs_enough_votes_and_other_sessions_on_the_pair():
    rng = random.Random(2)
    honest = honest_votes(rng, 30)
    short = adversary(rng, "short", 19, (20, 60), for_the_weaker, 10_000)  # below outlier_min_votes
    only_voter = [  # a pair nobody else voted on: no consensus to disagree with
        vote(20_000 + i, "alone", START + 60 * i, "tutor@9", "tutor@8", "ab"[i % 2 == 0]) for i in range(40)
    ]
    assert screen(in_seq_order(honest + short + only_voter)).excluded == []


def test_people_are_tested_against_people_not_against_a_judges_votes():
    """A judge that bootstrapped the loop prefers what it prefers; a person who disagrees with it is no outlier."""
    rng = random.Random(4)
    judges = [replace(v, session_id=judge_session("rule", v.session_id)) for v in honest_votes(rng, 40)]
    person = adversary(rng, "person", 40, (20, 60), for_the_weaker, 10_000)  # prefers what the judges rank last
    assert screen(in_seq_order(judges + person)).excluded == []


def test_screening_is_deterministic_whatever_the_order_of_the_votes():
    rng = random.Random(3)
    votes = in_seq_order(honest_votes(rng, 20) + adversary(rng, "bot", 300, (0.2, 1.0), for_the_weaker, 10_000))
    shuffled = votes[:]
    rng.shuffle(shuffled)
    first, second = screen(votes), screen(shuffled)
    assert sorted(first.excluded, key=lambda e: e.seq) == sorted(second.excluded, key=lambda e: e.seq)
    assert [v.vote_id for v in first.kept] == [v.vote_id for v in votes if v.vote_id not in first.excluded_ids()]


def test_settings_refuse_values_that_would_disable_a_rule_by_accident():
    with pytest.raises(LoraflowError, match="daily_cap 0"):
        HygieneSettings(daily_cap=0)
    with pytest.raises(LoraflowError, match="outlier_alpha is 1.5"):
        HygieneSettings(outlier_alpha=1.5)
    with pytest.raises(LoraflowError, match="min_interval_s is -1"):
        HygieneSettings(min_interval_s=-1)


def test_tail_probabilities_match_direct_sums():
    assert binomial_lower_tail(0, 12, 0.5) == pytest.approx(0.5**12)
    assert binomial_lower_tail(3, 10, 0.3) == pytest.approx(0.6496107184, rel=1e-9)
    pmf = beta_binomial_pmf(5, 1.0, 1.0)  # a uniform prior: every count equally likely
    assert pmf == pytest.approx([1 / 6] * 6)
    assert beta_binomial_pmf(40, 3.5, 7.0).sum() == pytest.approx(1.0)
    two = [beta_binomial_pmf(4, 2.0, 3.0), beta_binomial_pmf(3, 5.0, 1.0)]
    direct = sum(two[0][i] * two[1][j] for i in range(5) for j in range(4) if i + j <= 2)
    assert sum_lower_tail(two, 2) == pytest.approx(direct, abs=1e-12)


def test_adversarial_voters_steer_neither_the_ratings_nor_the_training_pairs(capsys):
    """Honest people mixed with five attacks, each realistic for the rule meant to stop it: a bot (fast, many votes),
    a flooder at a human-looking pace past the daily cap, a button masher, and two kinds of human-paced voters for
    the weaker side (one session; three sybil sessions) that only the outlier test can catch."""
    rng = random.Random(7)
    honest = honest_votes(rng, 80)
    attacks = {
        "bot": adversary(rng, "bot", 1500, (0.3, 1.2), for_the_weaker, 100_000),
        "flooder": adversary(rng, "flooder", 900, (3, 8), lambda a, b: weakest_wins(a, b, rng), 200_000),
        "masher": adversary(rng, "masher", 60, (15, 40), lambda a, b: "a", 300_000),
        "contrarian": adversary(rng, "contrarian", 150, (20, 60), for_the_weaker, 400_000),
    }
    for sybil in range(3):
        attack = adversary(rng, f"sybil-{sybil}", 60, (20, 60), lambda a, b: weakest_wins(a, b, rng), 500_000 + sybil)
        attacks[f"sybil-{sybil}"] = [replace(v, vote_id=f"{v.vote_id}-{sybil}") for v in attack]
    adversarial = [v for votes in attacks.values() for v in votes]
    everything = in_seq_order(honest + adversarial)
    honest_ids = {v.vote_id for v in honest}
    adversarial_ids = {v.vote_id for v in adversarial}

    screened = screen(everything)
    kept_ids = {v.vote_id for v in screened.kept}
    rules_per_attack = {name: sorted({e.rule for e in screened.excluded if e.session_id == name}) for name in attacks}
    honest_only = ratings_of([v for v in everything if v.vote_id in honest_ids])
    on_kept = ratings_of(screened.kept)
    on_all = ratings_of(everything)
    truth_order = sorted(TRUTH, key=TRUTH.get, reverse=True)
    pairs = {
        label: preference_pairs([v for v in everything if v.vote_id in ids])
        for label, ids in (("honest only", honest_ids), ("kept", kept_ids), ("all", honest_ids | adversarial_ids))
    }
    with capsys.disabled():
        print(f"\n{len(honest)} honest votes in 80 sessions, {len(adversarial)} adversarial in {len(attacks)}")
        print(f"excluded per rule: {screened.counts()}")
        print(f"rules that caught each attack: {rules_per_attack}")
        print(f"honest votes excluded: {len(honest_ids - kept_ids)}")
        print(f"{'contestant':<10} {'truth':>7} {'honest':>8} {'kept':>8} {'all':>8}")
        for name in truth_order:
            print(f"{name:<10} {TRUTH[name]:7.0f} {honest_only[name]:8.1f} {on_kept[name]:8.1f} {on_all[name]:8.1f}")
        for label, found in pairs.items():
            weak = sum(pair["chosen_model"] == WEAKEST for pair in found)
            print(f"pairs ({label}): {len(found)}, {weak / len(found):.1%} choose {WEAKEST}")

    assert adversarial_ids.isdisjoint(kept_ids)
    assert len(honest_ids - kept_ids) <= 0.01 * len(honest_ids)
    assert rules_per_attack["contrarian"] == [OUTLIER] and all(
        rules_per_attack[f"sybil-{i}"] == [OUTLIER] for i in range(3)
    )
    assert rules_per_attack["masher"] == [SAME_SIDE]
    assert RAPID_FIRE in rules_per_attack["bot"] and DAILY_CAP in rules_per_attack["flooder"]
    # (a) the ratings: the truth's order, and the honest-only ratings within a few points
    assert sorted(on_kept, key=on_kept.get, reverse=True) == truth_order
    assert max(abs(on_kept[name] - honest_only[name]) for name in TRUTH) < 10.0
    assert on_all[WEAKEST] - honest_only[WEAKEST] > 100.0  # unscreened, the attacks lift the weakest measurably
    # (b) the next version's training data: no adversarial pair
    assert {pair["vote_id"] for pair in pairs["kept"]}.isdisjoint(adversarial_ids)
