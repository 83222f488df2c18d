"""Arena votes in any database SQLAlchemy reaches: SQLite with WAL by default, Postgres by URL.

A vote carries an id the client made for its round, so a double click or a retry is stored once.
`VoteStore.record` returns only after the transaction committed, so the UI acknowledges only what is on disk.
Concurrent `record` calls in one process share a transaction (group commit): one commit for many votes.
Each vote also gets `seq`, a number that grows with every insert; the loop cites vote ranges by it.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

from sqlalchemy import (
    Float,
    Integer,
    String,
    Text,
    bindparam,
    create_engine,
    event,
    func,
    insert,
    inspect,
    select,
    union,
)
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    IntegrityError,
    NoSuchModuleError,
    OperationalError,
    StatementError,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from loraflow.arena.settings import RateLimit
from loraflow.hub.errors import LoraflowError

OUTCOMES = ("a", "b", "tie", "both_bad")
DECISIVE = ("a", "b")
DEFAULT_DATABASE = "votes.db"
BASE_CONTESTANT = "base"
SQLITE_HEADER = b"SQLite format 3\x00"
MAX_BATCH = 500  # votes per group commit; keeps `vote_id IN (...)` well under SQLite's variable limit
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


_VOTES = VoteRow.__table__
# The write path's statements, built once: building a statement costs more CPU than SQLite takes to run it.
_SELECT_BY_ID = select(_VOTES).where(_VOTES.c.vote_id.in_(bindparam("vote_ids", expanding=True)))
_SELECT_RECENT = (
    select(_VOTES.c.session_id, _VOTES.c.created)
    .where(_VOTES.c.session_id.in_(bindparam("sessions", expanding=True)), _VOTES.c.created > bindparam("since"))
    .order_by(_VOTES.c.created)
)
_INSERT_RETURNING = insert(_VOTES).returning(*_VOTES.c)
_SELECT_OUTCOMES_AFTER = (
    select(_VOTES.c.seq, _VOTES.c.contestant_a, _VOTES.c.contestant_b, _VOTES.c.outcome)
    .where(_VOTES.c.seq > bindparam("after_seq"))
    .order_by(_VOTES.c.seq)
)
SWAPPED = {"a": "b", "b": "a"}  # an outcome read from the other side; ties and both-bad read the same


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

    @property
    def same_contestant(self) -> bool:
        """Two samples of one version (an on-policy round): they compare answers, not versions."""
        return self.contestant_a == self.contestant_b


@dataclass(frozen=True)
class Recorded:
    vote: Vote
    created_now: bool


class RateLimited(LoraflowError):
    """This session voted more often than the store allows; the message says when to try again."""


def _between(first: str, second: str):
    c = _VOTES.c
    return ((c.contestant_a == first) & (c.contestant_b == second)) | (
        (c.contestant_a == second) & (c.contestant_b == first)
    )


@dataclass(frozen=True)
class HeadToHead:
    """Votes between two contestants, from `first`'s side: its wins, its losses, and draws (ties, both bad)."""

    first: str
    second: str
    wins: int = 0
    losses: int = 0
    draws: int = 0

    @property
    def games(self) -> int:
        return self.wins + self.losses + self.draws

    def plus(self, outcome_for_first_as_a: str, count: int = 1) -> HeadToHead:
        """Count `count` votes whose outcome reads as if `first` answered as A."""
        if outcome_for_first_as_a == "a":
            return replace(self, wins=self.wins + count)
        if outcome_for_first_as_a == "b":
            return replace(self, losses=self.losses + count)
        return replace(self, draws=self.draws + count)

    @classmethod
    def of(cls, votes: Iterable[Vote], first: str, second: str) -> HeadToHead:
        tally = cls(first, second)
        for vote in votes:
            if {vote.contestant_a, vote.contestant_b} == {first, second} and first != second:
                from_first = vote.outcome if vote.contestant_a == first else SWAPPED.get(vote.outcome, vote.outcome)
                tally = tally.plus(from_first)
        return tally


def _row_to_vote(row) -> Vote:
    """A Vote from a VoteRow or a Core row of the votes table."""
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


def _vote_row(vote: Vote, created: float) -> dict:
    return {
        "vote_id": vote.vote_id,
        "created": created,
        "session_id": vote.session_id,
        "prompt": vote.prompt,
        "answer_a": vote.answer_a,
        "answer_b": vote.answer_b,
        "contestant_a": vote.contestant_a,
        "contestant_b": vote.contestant_b,
        "outcome": vote.outcome,
    }


class _Waiter:
    """One caller's vote in the queue; `ready` is set when it is to lead a commit, or when its result is in."""

    def __init__(self, vote: Vote):
        self.vote = vote
        self.ready = threading.Event()
        self.result: Recorded | BaseException | None = None


class GroupCommit:
    """Concurrent callers share one transaction. One caller at a time leads: it commits everything queued (its own
    vote first), hands each caller its result, and passes the lead to the first caller that queued meanwhile. A lone
    caller leads at once; there is no thread of its own and no timer."""

    def __init__(self, commit_batch):
        self._commit_batch = commit_batch  # list[Vote] -> list[Recorded | Exception], one per vote, after COMMIT
        self._lock = threading.Lock()
        self._queue: list[_Waiter] = []
        self._leader: _Waiter | None = None
        self._last_batch = 1

    def submit(self, vote: Vote) -> Recorded:
        waiter = _Waiter(vote)
        with self._lock:
            self._queue.append(waiter)
            if self._leader is None:
                self._pass_lead()
        try:
            waiter.ready.wait()
            if waiter.result is None:  # this caller leads
                self._commit_queue()
        finally:
            if waiter.result is None:  # interrupted (KeyboardInterrupt): leave the queue, and the lead to another
                with self._lock:
                    if waiter in self._queue:
                        self._queue.remove(waiter)
                    if self._leader is waiter:
                        self._pass_lead()
        if isinstance(waiter.result, BaseException):
            raise waiter.result
        return waiter.result

    def _pass_lead(self) -> None:
        self._leader = self._queue[0] if self._queue else None
        if self._leader is not None:
            self._leader.ready.set()

    def _commit_queue(self) -> None:
        # Callers woken by a shared commit tend to vote again at once: yield the GIL while they keep arriving (at
        # most until as many as last time are queued), so they share this commit instead of each leading one alone.
        queued = 0
        while queued < len(self._queue) < self._last_batch:
            queued = len(self._queue)
            time.sleep(0)
        with self._lock:
            batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            self._last_batch = len(batch)
        try:
            results = self._commit_batch([waiter.vote for waiter in batch])
        except BaseException as error:  # the whole batch failed (database gone, locked past the timeout, ...)
            results = [error] * len(batch)
        with self._lock:
            for waiter, result in zip(batch, results, strict=True):
                waiter.result = result
                waiter.ready.set()
            self._pass_lead()


class VoteStore:
    """All reads and writes of votes. Holds an engine and the group-commit queue; safe to share between threads.

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
        self._group = GroupCommit(self._record_batch)
        self._outcome_counts: Counter[tuple[str, str, str]] = Counter()  # votes per (A, B, outcome)
        self._counted_seq = 0  # the newest vote in _outcome_counts
        self._count_lock = threading.Lock()

    def record(self, vote: Vote) -> Recorded:
        """Store the vote once and commit; a repeated vote_id returns the stored vote unchanged.

        Raises RateLimited when the vote's session voted too often; other callers in the same group commit are
        unaffected by this vote's refusal."""
        if vote.outcome not in OUTCOMES:
            raise LoraflowError(f"vote outcome {vote.outcome!r} is not one of {', '.join(OUTCOMES)}.")
        if not vote.vote_id or len(vote.vote_id) > 64:
            raise LoraflowError("a vote needs an id of 1 to 64 characters (the client makes one per round).")
        return self._group.submit(vote)

    def _record_batch(self, votes: list[Vote]) -> list[Recorded | Exception]:
        """Commit the batch in one transaction; if the database refuses a vote in it, commit each vote alone so that
        the refused vote fails only its own caller. A database in trouble (locked, gone, full) fails the batch."""
        try:
            return self._commit(votes)
        except OperationalError:
            raise
        except StatementError:
            if len(votes) == 1:
                raise
        results: list[Recorded | Exception] = []
        for vote in votes:
            try:
                results += self._commit([vote])
            except OperationalError:
                raise
            except StatementError as refusal:
                results.append(refusal)
        return results

    def _commit(self, votes: list[Vote]) -> list[Recorded | Exception]:
        """One transaction: one existence check, one rate-limit query and one insert for all of `votes`."""
        try:
            with self.engine.begin() as connection:
                now = time.time()
                found = connection.execute(_SELECT_BY_ID, {"vote_ids": list({vote.vote_id for vote in votes})})
                stored = {vote.vote_id: vote for vote in map(_row_to_vote, found)}
                recent = self._recent_votes(connection, {v.session_id for v in votes if v.vote_id not in stored}, now)
                outcomes: list[str | Exception] = []  # per vote: its id, or why it was refused
                rows: dict[str, dict] = {}
                for vote in votes:
                    if vote.vote_id not in stored and vote.vote_id not in rows:
                        try:
                            self._check_rate(recent[vote.session_id], now)
                        except RateLimited as refusal:
                            outcomes.append(refusal)
                            continue
                        recent[vote.session_id].append(now)
                        rows[vote.vote_id] = _vote_row(vote, now)
                    outcomes.append(vote.vote_id)
                inserted = connection.execute(_INSERT_RETURNING, list(rows.values())) if rows else []
                created = {vote.vote_id: vote for vote in map(_row_to_vote, inserted)}
        except IntegrityError:
            if len(votes) > 1:
                raise
            # Another writer (another UI instance on Postgres) stored the same id between our check and insert.
            return [Recorded(self.get(votes[0].vote_id), created_now=False)]
        results: list[Recorded | Exception] = []
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                results.append(outcome)
            elif outcome in stored:
                results.append(Recorded(stored[outcome], created_now=False))
            else:
                results.append(Recorded(created[outcome], created_now=True))
                stored[outcome] = created[outcome]  # a repeat later in this batch finds it stored
        return results

    def _recent_votes(self, connection: Connection, sessions: set[str], now: float) -> defaultdict[str, list[float]]:
        """Each session's vote times inside the rate-limit window, oldest first."""
        recent: defaultdict[str, list[float]] = defaultdict(list)
        if self.rate_limit is None or not sessions:
            return recent
        since = now - self.rate_limit.window_s
        for session_id, created in connection.execute(_SELECT_RECENT, {"sessions": list(sessions), "since": since}):
            recent[session_id].append(created)
        return recent

    def _check_rate(self, recent: list[float], now: float) -> None:
        if self.rate_limit is None:
            return
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
        self,
        *,
        contestants: Iterable[str] | None = None,
        name: str | None = None,
        between: tuple[str, str] | None = None,
        after_seq: int = 0,
    ) -> list[Vote]:
        """Votes in insertion order; filtered to those naming one of `contestants`, or any version of adapter `name`,
        or to the head-to-head votes `between` two contestants."""
        c = _VOTES.c
        query = select(_VOTES).where(c.seq > after_seq).order_by(c.seq)  # Core rows: no ORM objects to build
        if between is not None:
            query = query.where(_between(*between))
        if contestants is not None:
            wanted = list(contestants)
            query = query.where(c.contestant_a.in_(wanted) | c.contestant_b.in_(wanted))
        if name is not None:
            pattern = name.replace("_", "\\_") + "@%"  # '_' is a LIKE wildcard and may appear in names
            query = query.where(c.contestant_a.like(pattern, escape="\\") | c.contestant_b.like(pattern, escape="\\"))
        with self.engine.connect() as connection:
            return [_row_to_vote(row) for row in connection.execute(query)]

    def head_to_head(self, first: str, second: str) -> HeadToHead:
        """The outcomes of the votes between two contestants. The store counts votes per (A, B, outcome) and adds only
        the votes stored since it last counted (one read along the primary key), so a call's work does not grow with
        the votes stored; the first call counts them all once."""
        if first == second:
            return HeadToHead(first, second)
        with self._count_lock:
            with self.engine.connect() as connection:
                new = connection.execute(_SELECT_OUTCOMES_AFTER, {"after_seq": self._counted_seq}).all()
            for _, contestant_a, contestant_b, outcome in new:
                self._outcome_counts[contestant_a, contestant_b, outcome] += 1
            if new:
                self._counted_seq = new[-1].seq
            counts = self._outcome_counts
            tally = HeadToHead(first, second)
            for outcome in OUTCOMES:
                tally = tally.plus(outcome, counts[first, second, outcome])
                tally = tally.plus(SWAPPED.get(outcome, outcome), counts[second, first, outcome])
        return tally

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
