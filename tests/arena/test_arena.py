"""The arena's round logic without a server: contestants, focus on a new version, the one vote path, auth parsing."""

from __future__ import annotations

import random

import pytest

from loraflow.arena.cli import _auth
from loraflow.arena.judge import pirate_rule
from loraflow.arena.matchmaking import Pairing
from loraflow.arena.rounds import Arena, ArenaSettings, Round
from loraflow.arena.votes import RateLimit, RateLimited, VoteStore
from loraflow.hub.errors import LoraflowError
from tests.conftest import make_adapter, run_loraflow


@pytest.fixture
def arena(tiny_base, tiny_adapter, registry, tmp_path):
    registry.publish(tiny_adapter, "pirate", base=tiny_base, trainer={"name": "external"})
    store = VoteStore(str(tmp_path / "votes.db"), rate_limit=RateLimit(votes=3, window_s=60))
    # No request reaches this address: these tests never generate.
    built = Arena(ArenaSettings(names=["pirate"], server_url="http://127.0.0.1:9", base_model="tiny"), registry, store)
    yield built
    built.close()


def finished_round(pairing=Pairing("pirate@1", "base")) -> Round:
    return Round("round-1", "What is 2 plus 2?", pairing, ("Arr! 4, matey.", "4."))


def test_contestants_are_the_base_and_the_versions(arena, tiny_base, tmp_path):
    assert arena.contestants() == ["base", "pirate@1"]
    assert arena.focus() is None
    v2 = make_adapter(tiny_base, tmp_path / "v2", seed=1)
    arena.registry.publish(v2, "pirate", base=tiny_base, parent="pirate@1")
    assert arena.contestants() == ["base", "pirate@1", "pirate@2"]
    assert arena.focus() == ("pirate@2", "pirate@1")
    arena.settings.on_policy_share = 0
    rounds = [arena.new_round("hi", random.Random(seed)) for seed in range(10)]
    pairs = {frozenset((r.pairing.a, r.pairing.b)) for r in rounds}
    assert pairs == {frozenset({"pirate@1", "pirate@2"})}
    assert arena.lineages() == [["pirate@1", "pirate@2"]]


def test_on_policy_rounds_show_two_samples_of_the_live_version_at_their_share(arena, tiny_base, tmp_path):
    arena.registry.publish(
        make_adapter(tiny_base, tmp_path / "v2", seed=1), "pirate", base=tiny_base, parent="pirate@1"
    )
    assert arena.registry.live("pirate").ref == "pirate@1"
    rng = random.Random(0)
    pairings = [arena.new_round("hi", rng).pairing for _ in range(400)]
    own = [p for p in pairings if p.a == p.b]
    assert {(p.a, p.b) for p in own} == {("pirate@1", "pirate@1")}
    assert 160 < len(own) < 240  # the default share, 0.5
    assert all({p.a, p.b} == {"pirate@1", "pirate@2"} for p in pairings if p.a != p.b)  # the rest: the gate's pair
    arena.settings.on_policy_share = 1
    assert all(arena.new_round("hi", rng).pairing == Pairing("pirate@1", "pirate@1") for _ in range(20))


def test_the_focus_ends_once_the_gate_can_decide(arena, tiny_base, tmp_path):
    arena.registry.publish(
        make_adapter(tiny_base, tmp_path / "v2", seed=1), "pirate", base=tiny_base, parent="pirate@1"
    )
    for number in range(7):
        arena.vote(Round(f"r{number}", "p", Pairing("pirate@2", "pirate@1"), ("x", "y")), "a", f"visitor-{number}")
    arena.vote(Round("r7", "p", Pairing("pirate@2", "pirate@1"), ("x", "y")), "b", "visitor-7")
    assert arena.focus() == ("pirate@2", "pirate@1")  # 7 of 8: the interval still reaches below 0.5
    arena.vote(Round("r8", "p", Pairing("pirate@1", "pirate@2"), ("x", "y")), "b", "visitor-8")
    arena.vote(Round("r9", "p", Pairing("pirate@1", "pirate@2"), ("x", "y")), "b", "visitor-9")
    assert arena.focus() is None  # 9 of 10: the gate promotes, no more votes needed


def test_one_vote_path_stores_the_round_once(arena):
    played = finished_round()
    first = arena.vote(played, pirate_rule(*played.answers), "visitor")
    again = arena.vote(played, "b", "visitor")  # a double click, or a retry after a lost response
    assert first.created_now and not again.created_now
    stored = arena.store.get("round-1")
    assert (stored.outcome, stored.winner, stored.loser) == ("a", "pirate@1", "base")
    assert (stored.answer_a, stored.answer_b, stored.prompt) == played.answers + (played.prompt,)
    assert [row.contestant for row in arena.leaderboard()] == ["pirate@1", "base"]


def test_unfinished_rounds_and_eager_sessions_are_refused(arena):
    with pytest.raises(ValueError, match="both answers"):
        arena.vote(Round("r", "p", Pairing("pirate@1", "base"), ("half", "")), "a", "visitor")
    for number in range(3):
        arena.vote(Round(f"r{number}", "p", Pairing("pirate@1", "base"), ("x", "y")), "tie", "eager")
    with pytest.raises(RateLimited):
        arena.vote(Round("r9", "p", Pairing("pirate@1", "base"), ("x", "y")), "tie", "eager")


def test_regenerate_keeps_the_pair_under_a_new_vote_id(arena):
    played = finished_round()
    again = arena.regenerate(played)
    assert again.pairing == played.pairing and again.round_id != played.round_id and not again.finished


def test_auth_option_takes_a_pair_or_a_file(tmp_path):
    assert _auth("ann:secret") == [("ann", "secret")]
    logins = tmp_path / "logins"
    logins.write_text("ann:one\nbob:two:with-colon\n")
    assert _auth(str(logins)) == [("ann", "one"), ("bob", "two:with-colon")]
    with pytest.raises(LoraflowError, match="USER:PASSWORD"):
        _auth("no-colon")


def test_a_rejected_version_is_never_a_contestant_and_live_stays_in(arena, tiny_base, tmp_path):
    registry = arena.registry
    for number in (2, 3):
        adapter = make_adapter(tiny_base, tmp_path / f"v{number}", seed=number)
        registry.publish(adapter, "pirate", base=tiny_base, parent=f"pirate@{number - 1}")
    registry.reject("pirate@3", actor="test", reason="lost the gate")
    assert arena.contestants() == ["base", "pirate@1", "pirate@2"]
    assert arena.focus() is None  # the newest version was rejected, so nothing is focused on
    rounds = [arena.new_round("hi", random.Random(seed)) for seed in range(20)]
    assert all("pirate@3" not in (r.pairing.a, r.pairing.b) for r in rounds)
    arena.settings.max_versions = 1
    assert arena.contestants() == ["base", "pirate@2", "pirate@1"]  # the live version competes even when older


def test_a_prompt_version_is_a_contestant_beside_the_adapters(arena, tiny_base):
    arena.registry.publish_prompt("Answer like a pirate.", "pirate-prompt", base=tiny_base)
    arena.settings.names.append("pirate-prompt")
    assert arena.contestants() == ["base", "pirate@1", "pirate-prompt@1"]


def vote_as(arena: Arena, session: str, winner: str, loser: str, number: int) -> None:
    pairing = Pairing(winner, loser) if number % 2 else Pairing(loser, winner)
    outcome = "a" if number % 2 else "b"
    arena.vote(Round(f"{session}-{number}", "p", pairing, ("x", "y")), outcome, f"{session}-{number}")


def test_the_arena_page_shows_peoples_and_judges_votes_on_separate_boards(arena):
    from gradio_client import Client

    from loraflow.arena.judge import judge_session
    from loraflow.arena.ui import build_arena
    from loraflow.serve.launcher import free_port

    arena.store.rate_limit = None
    for number in range(3):
        vote_as(arena, "guest:person", "pirate@1", "base", number)
    for number in range(5):
        vote_as(arena, judge_session("pirate"), "base", "pirate@1", number)
    arena.live_leaderboard.refresh()  # the page shows the last background fit; wait for one with every vote
    blocks = build_arena(arena)
    port = free_port()
    blocks.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        people, _, people_text, judges, _, judges_text, lineage = client.predict(api_name="/leaderboard")
    finally:
        blocks.close()
    counts = {row[0]: row[6:] for row in people["data"]}  # votes, wins, losses, draws
    assert counts == {"pirate@1": [3, 3, 0, 0], "base": [3, 0, 3, 0]}
    assert [row[0] for row in people["data"]] == ["pirate@1", "base"]
    assert "from 3 people's votes" in people_text and "judges' votes are rated apart" in people_text
    counts = {row[0]: row[6:] for row in judges["data"]}
    assert counts == {"base": [5, 5, 0, 0], "pirate@1": [5, 0, 5, 0]}
    assert "from 5 judges' votes" in judges_text
    assert lineage == "pirate@1"


def test_votes_leaderboard_prints_peoples_and_judges_boards_apart(arena, registry):
    from loraflow.arena.judge import judge_session

    arena.store.rate_limit = None
    for number in range(4):
        vote_as(arena, "guest:person", "pirate@1", "base", number)
    for number in range(2):
        vote_as(arena, judge_session("pirate"), "base", "pirate@1", number)
    command = ["--registry", str(registry.path), "votes", "leaderboard", "pirate", "--votes", arena.store.url]
    both = run_loraflow(*command).stdout
    assert both.index("people's board (--voters human): 4 votes") < both.index("judges' board (--voters ai): 2 votes")
    people, judges = both.split("judges' board")
    assert "4/0/0" in people and "0/4/0" in people and "2/0/0" in judges and "0/2/0" in judges
    everyone = run_loraflow(*command, "--voters", "all").stdout
    assert "everyone's board (--voters all): 6 votes" in everyone and "people's" not in everyone
    assert "2/4/0" in everyone and "4/2/0" in everyone
    judges_only = run_loraflow(*command, "--voters", "ai").stdout
    assert "judges' board (--voters ai): 2 votes" in judges_only and "people's" not in judges_only
    wrong = run_loraflow(*command, "--voters", "robots", check=False)
    assert wrong.returncode == 2 and "--voters robots: give human, ai or all" in wrong.stderr
