"""One arena round, without any UI: pick two contestants, stream their answers, store the vote.

The Gradio arena and the simulated voter both go through `Arena`, so a test that votes through it
exercises the same path a person's click does. An `Arena` holds its settings and clients; nothing is
kept at module level.
"""

from __future__ import annotations

import queue
import random
import threading
import uuid
from dataclasses import dataclass, replace
from typing import Iterator

from loraflow.arena.gate import needs_votes
from loraflow.arena.matchmaking import Pairing, choose_pair, shuffled
from loraflow.arena.ratings import Board, LiveLeaderboard, Rating
from loraflow.arena.settings import ALL, HUMAN, ArenaSettings
from loraflow.arena.votes import BASE_CONTESTANT, Recorded, Vote, VoteStore
from loraflow.hub.registry import REJECTED, SERVABLE_KINDS, AdapterVersion, Registry

__all__ = ["Arena", "ArenaSettings", "Round", "is_rejected"]


@dataclass(frozen=True)
class Round:
    """What one vote is about. `round_id` becomes the vote id, so repeating a vote on this round counts once."""

    round_id: str
    prompt: str
    pairing: Pairing
    answers: tuple[str, str] = ("", "")

    @property
    def finished(self) -> bool:
        return all(self.answers)


def is_rejected(version: AdapterVersion) -> bool:
    return version.state == REJECTED


class Arena:
    def __init__(self, settings: ArenaSettings, registry: Registry, store: VoteStore, client=None):
        from openai import OpenAI

        self.settings = settings
        self.registry = registry
        self.store = store
        self.client = client or OpenAI(
            base_url=settings.server_url.rstrip("/") + "/v1", api_key=settings.api_key, max_retries=2
        )
        self._base_model = settings.base_model
        base_names = [settings.base_model] if settings.base_model else []
        self.live_leaderboard = LiveLeaderboard(store.url, hygiene=settings.hygiene, base_names=base_names)

    def contestants(self) -> list[str]:
        """The base, each name's newest versions that were not rejected, and its live version even when older."""
        found = [BASE_CONTESTANT] if self.settings.include_base else []
        snapshot = self.registry.snapshot()
        for name in self.settings.names:
            versions = [v for v in snapshot.versions(name) if v.kind in SERVABLE_KINDS and not is_rejected(v)]
            recent = [v.ref for v in versions[-self.settings.max_versions :]]
            live = snapshot.live(name)
            found += recent + ([live.ref] if live and live.ref not in recent else [])
        return found

    def live_versions(self) -> list[str]:
        snapshot = self.registry.snapshot()
        return [live.ref for live in map(snapshot.live, self.settings.names) if live is not None]

    def focus(self) -> tuple[str, str] | None:
        """The newest version of an arena adapter and its parent, while their head-to-head votes would still decide
        the gate (a candidate) or the watch after a promotion (a live version); None when nothing waits on votes."""
        snapshot = self.registry.snapshot()
        for name in self.settings.names:
            newest = snapshot.latest(name)
            if not newest.parent or is_rejected(newest):
                continue
            if needs_votes(self.store.head_to_head(newest.ref, newest.parent), self.settings.gate):
                return newest.ref, newest.parent
        return None

    def pairing(self, rng: random.Random) -> Pairing:
        """On-policy rounds first (two samples of a live version, at `on_policy_share`), then the pair the gate is
        waiting on, then any two contestants. Reads no vote but those stored since the last round (`focus`): counts
        and ratings come from the background leaderboard's last fit of every vote, people's and judges' alike, as
        the gate counts them."""
        live = self.live_versions()
        if live and rng.random() < self.settings.on_policy_share:
            own = rng.choice(live)
            return Pairing(own, own)
        focus = self.focus()
        if focus is not None:
            return shuffled(*focus, rng)
        board = self.live_leaderboard.latest(ALL)
        rows = board.ratings if board else ()
        counts = {row.contestant: row.votes for row in rows}
        return choose_pair(self.contestants(), counts, {row.contestant: row.bt for row in rows}, rng)

    def model_for(self, contestant: str) -> str:
        """The model name the server knows a contestant by: NAME@V for a version, the served base otherwise."""
        if contestant != BASE_CONTESTANT:
            return contestant
        if self._base_model is None:
            models = self.client.models.list().data
            self._base_model = next(m.id for m in models if getattr(m, "parent", None) is None)
        return self._base_model

    def new_round(self, prompt: str, rng: random.Random) -> Round:
        return Round(uuid.uuid4().hex, prompt, self.pairing(rng))

    def regenerate(self, current: Round) -> Round:
        """Fresh answers from the same two contestants, under a new vote id."""
        return Round(uuid.uuid4().hex, current.prompt, current.pairing)

    def _stream_one(self, contestant: str, prompt: str, side: int, sink: queue.Queue) -> None:
        try:
            stream = self.client.chat.completions.create(
                model=self.model_for(contestant),
                messages=[{"role": "user", "content": prompt}],
                max_tokens=self.settings.max_tokens,
                temperature=self.settings.temperature,
                stream=True,
            )
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    sink.put((side, chunk.choices[0].delta.content))
        except Exception as error:  # shown in place of the answer; the round cannot be voted on
            sink.put((side, error))
        finally:
            sink.put((side, None))

    def stream_answers(self, current: Round) -> Iterator[Round]:
        """Both answers at once, yielding the round each time either answer grows."""
        sink: queue.Queue = queue.Queue()
        contestants = (current.pairing.a, current.pairing.b)
        for side, contestant in enumerate(contestants):
            arguments = (contestant, current.prompt, side, sink)
            streaming = threading.Thread(target=self._stream_one, args=arguments, daemon=True)
            streaming.start()
        texts, open_sides = ["", ""], {0, 1}
        while open_sides:
            side, piece = sink.get()
            if piece is None:
                open_sides.discard(side)
                continue
            if isinstance(piece, Exception):
                raise RuntimeError(f"the server could not answer as {contestants[side]}: {piece}") from piece
            texts[side] += piece
            yield replace(current, answers=(texts[0], texts[1]))
        final = replace(current, answers=(texts[0] or " ", texts[1] or " "))
        yield final

    def play(self, prompt: str, rng: random.Random) -> Round:
        """A whole round without a UI: what the simulated voter does before it votes."""
        current = self.new_round(prompt, rng)
        for current in self.stream_answers(current):
            pass
        return current

    def vote(self, current: Round, outcome: str, session_id: str) -> Recorded:
        """The one vote path: every button of the UI and the simulated voter end here."""
        if not current.finished:
            raise ValueError("wait for both answers before voting.")
        return self.store.record(
            Vote(
                vote_id=current.round_id,
                session_id=session_id,
                prompt=current.prompt,
                answer_a=current.answers[0],
                answer_b=current.answers[1],
                contestant_a=current.pairing.a,
                contestant_b=current.pairing.b,
                outcome=outcome,
            )
        )

    def leaderboard(self, voters: str = HUMAN) -> list[Rating]:
        """Ratings that include every vote `voters` stored so far (people's by default): waits for a refit."""
        return list(self.live_leaderboard.refresh()[voters].ratings)

    def latest_board(self, voters: str = HUMAN) -> Board | None:
        """The background fit's last board of `voters` (people's by default), for a page: reads no votes and fits
        nothing (None before the first)."""
        return self.live_leaderboard.latest(voters)

    def close(self) -> None:
        """Stop the background leaderboard's process."""
        self.live_leaderboard.close()

    def lineages(self) -> list[list[str]]:
        return [[v.ref for v in self.registry.lineage(f"{name}@latest")] for name in self.settings.names]
