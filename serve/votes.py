"""Arena votes in any database SQLAlchemy reaches: SQLite with WAL by default, Postgres by URL.

A vote carries an id the client made for its round, so a double click or a retry is stored once.
`VoteStore.record` returns only after the transaction committed, so the UI acknowledges only what is on disk.
Each vote also gets `seq`, a number that grows with every insert; the loop cites vote ranges by it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from sqlalchemy import Float, Integer, String, Text, create_engine, event, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from hub.errors import LoraflowError

OUTCOMES = ("a", "b", "tie", "both_bad")
DECISIVE = ("a", "b")
DEFAULT_DATABASE = "votes.db"
BASE_CONTESTANT = "base"


def votes_url(explicit: str | None = None) -> str:
    """--votes beats LORAFLOW_VOTES beats ./votes.db; a plain path means SQLite."""
    value = explicit or os.environ.get("LORAFLOW_VOTES") or DEFAULT_DATABASE
    return value if "://" in value else f"sqlite:///{Path(value).resolve()}"


class Base(DeclarativeBase):
    pass


class VoteRow(Base):
    __tablename__ = "votes"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    vote_id: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    created: Mapped[float] = mapped_column(Float, nullable=False, index=True)
    session_id: Mapped[str] = mapped_column(String(128), nullable=False, index=True)
    prompt: Mapped[str] = mapped_column(Text, nullable=False)
    answer_a: Mapped[str] = mapped_column(Text, nullable=False)
    answer_b: Mapped[str] = mapped_column(Text, nullable=False)
    contestant_a: Mapped[str] = mapped_column(String(160), nullable=False, index=True)
    contestant_b: Mapped[str] = mapped_column(String(160), nullable=False, index=True)
    outcome: Mapped[str] = mapped_column(String(16), nullable=False)


@dataclass(frozen=True)
class Vote:
    """One judgement of two anonymous answers to one prompt."""

    vote_id: str
    session_id: str
    prompt: str
    answer_a: str
    answer_b: str
    contestant_a: str
    contestant_b: str
    outcome: str
    created: float = 0.0
    seq: int = 0

    @property
    def winner(self) -> str | None:
        return {"a": self.contestant_a, "b": self.contestant_b}.get(self.outcome)

    @property
    def loser(self) -> str | None:
        return {"a": self.contestant_b, "b": self.contestant_a}.get(self.outcome)


@dataclass(frozen=True)
class Recorded:
    vote: Vote
    created_now: bool


class RateLimited(LoraflowError):
    """This session voted more often than the store allows; the message says when to try again."""


@dataclass(frozen=True)
class RateLimit:
    """At most `votes` per session within any `window_s` seconds."""

    votes: int = 30
    window_s: float = 60.0


def _row_to_vote(row: VoteRow) -> Vote:
    return Vote(
        vote_id=row.vote_id,
        session_id=row.session_id,
        prompt=row.prompt,
        answer_a=row.answer_a,
        answer_b=row.answer_b,
        contestant_a=row.contestant_a,
        contestant_b=row.contestant_b,
        outcome=row.outcome,
        created=row.created,
        seq=row.seq,
    )


def _sqlite_engine(url: str, synchronous: str):
    """WAL lets readers run beside the writer; BEGIN IMMEDIATE takes the write lock up front so writers queue
    on the busy timeout instead of failing on a lock upgrade."""
    engine = create_engine(url, connect_args={"timeout": 60, "isolation_level": None})

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection, _record):
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


class VoteStore:
    """All reads and writes of votes. Holds an engine, nothing else; safe to share between threads."""

    def __init__(self, url: str | None = None, rate_limit: RateLimit | None = RateLimit(), synchronous: str = "FULL"):
        self.url = votes_url(url)
        self.rate_limit = rate_limit
        if self.url.startswith("sqlite"):
            Path(self.url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            self.engine = _sqlite_engine(self.url, synchronous)
        else:
            self.engine = create_engine(self.url, pool_pre_ping=True)
        Base.metadata.create_all(self.engine)

    def record(self, vote: Vote) -> Recorded:
        """Store the vote once and commit; a repeated vote_id returns the stored vote unchanged."""
        if vote.outcome not in OUTCOMES:
            raise LoraflowError(f"vote outcome {vote.outcome!r} is not one of {', '.join(OUTCOMES)}.")
        if vote.contestant_a == vote.contestant_b:
            raise LoraflowError(f"a vote compares two different contestants, not {vote.contestant_a} with itself.")
        if not vote.vote_id or len(vote.vote_id) > 64:
            raise LoraflowError("a vote needs an id of 1 to 64 characters (the client makes one per round).")
        now = time.time()
        try:
            with Session(self.engine) as session, session.begin():
                existing = session.scalar(select(VoteRow).where(VoteRow.vote_id == vote.vote_id))
                if existing is not None:
                    return Recorded(_row_to_vote(existing), created_now=False)
                self._check_rate(session, vote.session_id, now)
                row = VoteRow(
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
                session.add(row)
                session.flush()
                stored = _row_to_vote(row)
        except IntegrityError:
            # Another writer (another UI instance on Postgres) stored the same id between our check and insert.
            return Recorded(self.get(vote.vote_id), created_now=False)
        return Recorded(stored, created_now=True)

    def _check_rate(self, session: Session, session_id: str, now: float) -> None:
        if self.rate_limit is None:
            return
        window_start = now - self.rate_limit.window_s
        recent = session.scalars(
            select(VoteRow.created).where(VoteRow.session_id == session_id, VoteRow.created > window_start).order_by(VoteRow.created)
        ).all()
        if len(recent) >= self.rate_limit.votes:
            wait_s = recent[len(recent) - self.rate_limit.votes] + self.rate_limit.window_s - now
            raise RateLimited(
                f"this session cast {len(recent)} votes in the last {self.rate_limit.window_s:.0f} s "
                f"(limit {self.rate_limit.votes}); try again in {max(wait_s, 0.1):.0f} s."
            )

    def get(self, vote_id: str) -> Vote:
        with Session(self.engine) as session:
            row = session.scalar(select(VoteRow).where(VoteRow.vote_id == vote_id))
            if row is None:
                raise LoraflowError(f"no vote with id {vote_id!r} in {self.url}.")
            return _row_to_vote(row)

    def votes(self, *, contestants: Iterable[str] | None = None, name: str | None = None, after_seq: int = 0) -> list[Vote]:
        """Votes in insertion order; filtered to those naming one of `contestants`, or any version of adapter `name`."""
        query = select(VoteRow).where(VoteRow.seq > after_seq).order_by(VoteRow.seq)
        if contestants is not None:
            wanted = list(contestants)
            query = query.where(VoteRow.contestant_a.in_(wanted) | VoteRow.contestant_b.in_(wanted))
        if name is not None:
            pattern = name.replace("_", "\\_") + "@%"  # '_' is a LIKE wildcard and may appear in names
            query = query.where(VoteRow.contestant_a.like(pattern, escape="\\") | VoteRow.contestant_b.like(pattern, escape="\\"))
        with Session(self.engine) as session:
            return [_row_to_vote(row) for row in session.scalars(query)]

    def count(self) -> int:
        with Session(self.engine) as session:
            return session.scalar(select(func.count()).select_from(VoteRow))

    def dispose(self) -> None:
        self.engine.dispose()
