"""Arena votes in any database SQLAlchemy reaches: SQLite with WAL by default, Postgres by URL.

A vote carries an id the client made for its round, so a double click or a retry is stored once.
`VoteStore.record` returns only after the transaction committed, so the UI acknowledges only what is on disk.
Each vote also gets `seq`, a number that grows with every insert; the loop cites vote ranges by it.
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from sqlalchemy import Float, Integer, String, Text, create_engine, event, func, inspect, select, union
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, NoSuchModuleError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from loraflow.arena.settings import RateLimit
from loraflow.hub.errors import LoraflowError

OUTCOMES = ("a", "b", "tie", "both_bad")
DECISIVE = ("a", "b")
DEFAULT_DATABASE = "votes.db"
BASE_CONTESTANT = "base"
SQLITE_HEADER = b"SQLite format 3\x00"
DATABASE_HINT = "point --votes (or LORAFLOW_VOTES) at a vote database, or at a path that does not exist yet"
READER_HINT = "point --votes (or LORAFLOW_VOTES) at the database `loraflow arena` stores votes in"


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


def _sqlite_engine(url: URL, synchronous: str):
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


def parse_votes_url(url: str) -> URL:
    try:
        return make_url(url)
    except ArgumentError:
        raise LoraflowError(
            f"--votes {url!r} is not a database URL; "
            "give a file path, sqlite:///PATH or postgresql+psycopg://USER@HOST/DB."
        ) from None


def check_sqlite_file(path: Path, create: bool) -> None:
    """Refuse a path that is not a vote database before SQLite opens it to write; nothing is repaired or overwritten."""
    if path.is_dir():
        raise LoraflowError(f"{path}: is a folder, not a vote database. Pass --votes {path / DEFAULT_DATABASE}.")
    if not path.is_file() or path.stat().st_size == 0:
        if not create:
            raise LoraflowError(f"{path}: no vote database here yet; {READER_HINT}.")
        return
    with open(path, "rb") as stream:
        if stream.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
            raise LoraflowError(f"{path}: not a SQLite database (it lacks the SQLite header); {DATABASE_HINT}.")
    try:
        probe = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
        try:
            tables = sorted(row[0] for row in probe.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))
        finally:
            probe.close()
    except sqlite3.Error as error:
        raise LoraflowError(
            f"{path}: a damaged SQLite file ({error}); restore it from a backup or {DATABASE_HINT}. "
            "loraflow leaves it as it is."
        ) from None
    if VoteRow.__tablename__ not in tables and (tables or not create):
        raise LoraflowError(
            f"{path}: a SQLite database without a votes table (tables: {', '.join(tables) or 'none'}); {DATABASE_HINT}."
        )


def _engine_for(url: URL, synchronous: str):
    try:
        if url.get_backend_name() == "sqlite":
            return _sqlite_engine(url, synchronous)
        return create_engine(url, pool_pre_ping=True)
    except (NoSuchModuleError, ImportError) as error:
        raise LoraflowError(
            f"--votes {url.render_as_string(hide_password=True)}: no database driver for {url.drivername!r} ({error}). "
            "Give a file path, sqlite:///PATH or postgresql+psycopg://USER@HOST/DB."
        ) from None


class VoteStore:
    """All reads and writes of votes. Holds an engine, nothing else; safe to share between threads.

    `create=False` is for readers (export, leaderboard): a missing database is an error instead of a new empty file."""

    def __init__(
        self,
        url: str | None = None,
        rate_limit: RateLimit | None = RateLimit(),
        synchronous: str = "FULL",
        create: bool = True,
    ):
        self.url = votes_url(url)
        self.rate_limit = rate_limit
        parsed = parse_votes_url(self.url)
        self.location = parsed.render_as_string(hide_password=True)
        sqlite_file = Path(parsed.database) if parsed.get_backend_name() == "sqlite" and parsed.database else None
        if sqlite_file is not None:
            check_sqlite_file(sqlite_file, create)
            if create:
                sqlite_file.parent.mkdir(parents=True, exist_ok=True)
        self.engine = _engine_for(parsed, synchronous)
        try:
            if create:
                Base.metadata.create_all(self.engine)
            elif not inspect(self.engine).has_table(VoteRow.__tablename__):
                raise LoraflowError(f"{self.location}: no votes table in this database yet; {READER_HINT}.")
        except DBAPIError as error:
            self.engine.dispose()
            reason = str(error.orig).strip().splitlines()[0] if error.orig else type(error).__name__
            message = f"{self.location}: cannot open the vote database ({reason}); {DATABASE_HINT}."
            raise LoraflowError(message) from None

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
            select(VoteRow.created)
            .where(VoteRow.session_id == session_id, VoteRow.created > window_start)
            .order_by(VoteRow.created)
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

    def votes(
        self, *, contestants: Iterable[str] | None = None, name: str | None = None, after_seq: int = 0
    ) -> list[Vote]:
        """Votes in insertion order; filtered to those naming one of `contestants`, or any version of adapter `name`."""
        query = select(VoteRow).where(VoteRow.seq > after_seq).order_by(VoteRow.seq)
        if contestants is not None:
            wanted = list(contestants)
            query = query.where(VoteRow.contestant_a.in_(wanted) | VoteRow.contestant_b.in_(wanted))
        if name is not None:
            pattern = name.replace("_", "\\_") + "@%"  # '_' is a LIKE wildcard and may appear in names
            query = query.where(
                VoteRow.contestant_a.like(pattern, escape="\\") | VoteRow.contestant_b.like(pattern, escape="\\")
            )
        with Session(self.engine) as session:
            return [_row_to_vote(row) for row in session.scalars(query)]

    def adapter_names(self) -> list[str]:
        """The adapter names with at least one vote: each NAME@V contestant's NAME."""
        contestants = union(select(VoteRow.contestant_a), select(VoteRow.contestant_b))
        with Session(self.engine) as session:
            found = session.scalars(contestants).all()
        return sorted({contestant.partition("@")[0] for contestant in found if "@" in contestant})

    def count(self) -> int:
        with Session(self.engine) as session:
            return session.scalar(select(func.count()).select_from(VoteRow))

    def dispose(self) -> None:
        self.engine.dispose()
