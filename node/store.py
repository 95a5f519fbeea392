"""The node's persistent store: jobs, attempts, agreements, receipts, the ledger and quotes seen, in SQLite.

Theory of operation: one SQLite file (``DATA_DIR/coop.db``) in WAL mode with ``synchronous=NORMAL``, so a daemon
restart (or crash) loses no committed job, agreement, receipt or ledger entry; only a power cut or an OS crash can
drop the last few commits. The API is synchronous: every call is one or two short statements on an indexed table,
cheap enough to make from the trio loop. The connection belongs to the thread that opened it.

Rules:
    * The store never reads the clock: every write that records a time takes ``now_ms`` (Unix milliseconds).
    * Each write runs in its own transaction (``BEGIN IMMEDIATE``), so it lands whole or not at all.
    * The store does not verify signatures: callers store Agreements and Receipts after ``cosign.verify_both``.
    * Agreements and receipts are keyed by ``cosign.terms_hash``; a receipt is also unique per job id, so a job
      this node ran for itself (client == provider) has one receipt, and no job is ever paid twice.
    * ``(job_id, role)`` is unique and clients choose job ids, so a provider must refuse a job whose id it already
      holds (``create_job`` raises :class:`DuplicateJob`).
    * Jobs, agreements and receipts are the node's record and are kept; quotes are bounded (oldest dropped).
    * Schema changes are appended to :data:`MIGRATIONS`, never edited; ``PRAGMA user_version`` says how many ran.

Errors: :class:`StoreError` and its subclasses for outcomes callers handle; ``ValueError`` for arguments no caller
should pass (unknown column, state or role); ``sqlite3.Error`` from the environment (disk full, I/O) propagates.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, Self, TypeVar

from protocol import codec
from protocol.cosign import terms_hash
from protocol.errors import ProtocolError
from protocol.messages import Agreement, PriceSheet, Receipt

Role = Literal["client", "provider"]
M = TypeVar("M", Agreement, Receipt)
ROLES: Final = ("client", "provider")
JOB_STATES: Final[Mapping[str, tuple[str, ...]]] = {
    "client": ("queued", "negotiating", "running", "completed", "failed", "cancelled"),
    "provider": ("running", "completed", "failed", "cancelled"),
}
INITIAL_STATE: Final[Mapping[str, str]] = {"client": "queued", "provider": "running"}
TERMINAL_STATES: Final = frozenset({"completed", "failed", "cancelled"})
# Columns update_job may set. attempts is kept by add_attempt; job_id, role, request and created_ms never change.
UPDATABLE_COLUMNS: Final = frozenset({"state", "provider", "client", "exit_status", "termination", "error", "cost"})
JSON_COLUMNS: Final = frozenset({"result"})
BUSY_TIMEOUT_MS: Final = 5000  # 5 s: only another process (a backup, the sqlite3 shell) can hold the write lock
MAX_QUOTES: Final = 10_000  # rows kept in the quotes table; the oldest go first
MAX_SQL_INT: Final = (1 << 63) - 1  # SQLite integers are signed 64-bit

# Each entry upgrades the schema from version i to i + 1. Append new entries; never edit a released one.
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """CREATE TABLE jobs (
            job_id TEXT NOT NULL, role TEXT NOT NULL CHECK (role IN ('client', 'provider')), state TEXT NOT NULL,
            created_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL, request TEXT NOT NULL,
            provider TEXT, client TEXT, attempts INTEGER NOT NULL DEFAULT 0, exit_status INTEGER,
            termination TEXT, error TEXT, cost INTEGER, result TEXT,
            PRIMARY KEY (job_id, role))""",
        "CREATE INDEX jobs_by_state ON jobs (role, state)",
        "CREATE INDEX jobs_by_created ON jobs (created_ms)",
        """CREATE TABLE job_attempts (
            job_id TEXT NOT NULL, role TEXT NOT NULL, attempt INTEGER NOT NULL, provider TEXT NOT NULL,
            started_ms INTEGER NOT NULL, ended_ms INTEGER, outcome TEXT, reason TEXT,
            PRIMARY KEY (job_id, role, attempt),
            FOREIGN KEY (job_id, role) REFERENCES jobs (job_id, role) ON DELETE CASCADE)""",
        """CREATE TABLE agreements (
            hash BLOB PRIMARY KEY, job_id TEXT NOT NULL, client TEXT NOT NULL, provider TEXT NOT NULL,
            role TEXT NOT NULL, blob BLOB NOT NULL, created_ms INTEGER NOT NULL,
            consumed INTEGER NOT NULL DEFAULT 0)""",
        "CREATE INDEX agreements_by_job ON agreements (job_id)",
        """CREATE TABLE receipts (
            hash BLOB PRIMARY KEY, job_id TEXT NOT NULL UNIQUE, client TEXT NOT NULL, provider TEXT NOT NULL,
            cost INTEGER NOT NULL, issued_ms INTEGER NOT NULL, blob BLOB NOT NULL)""",
        "CREATE INDEX receipts_by_client ON receipts (client)",
        "CREATE INDEX receipts_by_provider ON receipts (provider)",
        "CREATE INDEX receipts_by_issued ON receipts (issued_ms)",
        """CREATE TABLE quotes (
            id INTEGER PRIMARY KEY, job_id TEXT NOT NULL, provider TEXT NOT NULL, resource_class TEXT NOT NULL,
            cost INTEGER NOT NULL, price_sheet TEXT NOT NULL, load_permille INTEGER NOT NULL,
            received_ms INTEGER NOT NULL, outcome TEXT NOT NULL)""",
        "CREATE INDEX quotes_by_received ON quotes (received_ms)",
    ),
    (
        # Reputation records (issue: trust without a center), one per rater per receipt; see node/reputation.
        """CREATE TABLE reputation_records (
            id BLOB PRIMARY KEY, rater TEXT NOT NULL, ratee TEXT NOT NULL, receipt_hash BLOB NOT NULL,
            outcome TEXT NOT NULL, score INTEGER NOT NULL, time INTEGER NOT NULL, cost INTEGER NOT NULL,
            bundle BLOB NOT NULL, received_ms INTEGER NOT NULL)""",
        "CREATE INDEX reputation_by_time ON reputation_records (time, id)",
        "CREATE INDEX reputation_by_ratee ON reputation_records (ratee)",
    ),
)


class StoreError(Exception):
    """The store cannot do what was asked; the subclass says why."""


class DuplicateJob(StoreError):
    """A job with this id and role already exists. A client reused an id: the provider refuses the job."""


class NotFound(StoreError):
    """The job, attempt or agreement named does not exist: our bug, or a peer naming something we never stored."""


class DuplicateReceipt(StoreError):
    """A different receipt for a job that already has one: someone tries to be paid twice. Count it against them."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class JobRow:
    """One job in one role; ``request`` and ``result`` are the JSON columns, decoded."""

    job_id: str
    role: str
    state: str
    created_ms: int
    updated_ms: int
    request: dict[str, Any]
    provider: str | None
    client: str | None
    attempts: int
    exit_status: int | None
    termination: str | None
    error: str | None
    cost: int | None
    result: dict[str, Any] | None

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_STATES


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AttemptRow:
    """One start of a job on a provider; ``ended_ms``, ``outcome`` and ``reason`` stay None while it runs."""

    job_id: str
    role: str
    attempt: int
    provider: str
    started_ms: int
    ended_ms: int | None
    outcome: str | None
    reason: str | None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AgreementRow:
    """A stored agreement; ``role`` is ours in it, ``consumed`` whether a job was started under it."""

    hash: bytes
    job_id: str
    client: str
    provider: str
    role: str
    created_ms: int
    consumed: bool
    agreement: Agreement


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ReceiptRow:
    """A stored receipt, with the columns the ledger sums."""

    hash: bytes
    job_id: str
    client: str
    provider: str
    cost: int
    issued_ms: int
    receipt: Receipt


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LedgerEntry:
    """One receipt seen from one peer: 'earned' as provider, 'spent' as client, 'self' as both (nets to zero)."""

    job_id: str
    counterparty: str
    direction: Literal["earned", "spent", "self"]
    cost: int
    issued_ms: int


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Ledger:
    """Totals over every receipt naming this node; ``entries`` are the newest ones, up to the limit asked."""

    earned: int
    spent: int
    balance: int
    entries: list[LedgerEntry]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class QuoteRow:
    """A quote this node received and what it did with it; ``price_sheet`` is the sheet's fields."""

    id: int
    job_id: str
    provider: str
    resource_class: str
    cost: int
    price_sheet: dict[str, Any]
    load_permille: int
    received_ms: int
    outcome: str


def _json(value: Mapping[str, Any], what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} is not JSON-serialisable (write digests as hex): {exc}") from exc


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"role must be 'client' or 'provider', got {role!r}")


def _check_state(role: str, state: str) -> None:
    if state not in JOB_STATES[role]:
        raise ValueError(f"{state!r} is not a {role} job state; expected one of {JOB_STATES[role]}")


def _job(row: sqlite3.Row) -> JobRow:
    values = dict(row)
    values["request"] = json.loads(values["request"])
    values["result"] = None if values["result"] is None else json.loads(values["result"])
    return JobRow(**values)


def _decode(blob: bytes, cls: type[M]) -> M:
    try:
        return codec.decode(blob, cls)
    except ProtocolError as exc:  # only a damaged file or a buggy migration gets here
        raise StoreError(f"stored {cls.__name__} does not decode: {exc}") from exc


def _agreement(row: sqlite3.Row) -> AgreementRow:
    values = {**dict(row), "consumed": bool(row["consumed"])}
    agreement = _decode(values.pop("blob"), Agreement)
    return AgreementRow(**values, agreement=agreement)


def _receipt(row: sqlite3.Row) -> ReceiptRow:
    values = dict(row)
    receipt = _decode(values.pop("blob"), Receipt)
    return ReceiptRow(**values, receipt=receipt)


def _direction(client: str, provider: str, me: str) -> Literal["earned", "spent", "self"]:
    if client == provider:
        return "self"
    return "earned" if provider == me else "spent"


def migrate(db: sqlite3.Connection, migrations: Sequence[Sequence[str]] = MIGRATIONS) -> int:
    """Bring the schema up to ``len(migrations)``, one transaction per step; return the version reached.

    Raises:
        StoreError: the file was written by a newer node (its version is past what we know).
    """
    version: int = db.execute("PRAGMA user_version").fetchone()[0]
    if version > len(migrations):
        raise StoreError(f"database schema version {version} is newer than this node's ({len(migrations)})")
    for target in range(version + 1, len(migrations) + 1):
        with db:
            db.execute("BEGIN IMMEDIATE")
            for statement in migrations[target - 1]:
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {int(target)}")  # PRAGMA takes no parameters; target is an int
    return len(migrations)


class Store:
    """The node's SQLite store. Build with :meth:`open`; close with :meth:`close` or a ``with`` block."""

    def __init__(self, db: sqlite3.Connection, *, max_quotes: int = MAX_QUOTES) -> None:
        if max_quotes < 1:
            raise ValueError("max_quotes must be at least 1")
        self._db = db
        self._max_quotes = max_quotes

    @property
    def db(self) -> sqlite3.Connection:
        """The connection, for modules that own tables of their own (node/reputation/records.py)."""
        return self._db

    @classmethod
    def open(cls, path: Path, *, max_quotes: int = MAX_QUOTES) -> Store:
        """Open (creating if needed) the store at ``path`` and bring its schema up to date.

        Raises:
            StoreError: not a database, WAL unavailable, or written by a newer node.
        """
        # Job requests hold users' environment variables: create the file (and so its WAL) owner-only.
        try:
            os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
        except OSError as exc:
            raise StoreError(f"cannot open or create {path}: {exc.strerror}") from exc
        db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level="IMMEDIATE")
        try:
            db.row_factory = sqlite3.Row
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise StoreError(f"{path}: SQLite cannot use WAL here (journal mode {mode!r})")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            migrate(db)
        except sqlite3.DatabaseError as exc:
            db.close()
            raise StoreError(f"{path}: {exc}") from exc
        except StoreError:
            db.close()
            raise
        return cls(db, max_quotes=max_quotes)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------ jobs

    def create_job(
        self,
        job_id: str,
        role: Role,
        *,
        request: Mapping[str, Any],
        now_ms: int,
        state: str | None = None,
        provider: str | None = None,
        client: str | None = None,
    ) -> JobRow:
        """Record a new job: ``request`` is the submission as given (command, env, resources, limits, files...).

        Raises:
            DuplicateJob: a job with this id already exists in this role.
            ValueError: unknown role or state, or ``request`` is not JSON-serialisable.
        """
        _check_role(role)
        state = state or INITIAL_STATE[role]
        _check_state(role, state)
        try:
            with self._db:
                self._db.execute(
                    "INSERT INTO jobs (job_id, role, state, created_ms, updated_ms, request, provider, client)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (job_id, role, state, now_ms, now_ms, _json(request, "request"), provider, client),
                )
        except sqlite3.IntegrityError as exc:
            raise DuplicateJob(f"{role} job {job_id!r} already exists") from exc
        return self._must_get_job(job_id, role)

    def update_job(self, job_id: str, role: Role, now_ms: int, **fields: Any) -> JobRow:
        """Set some of the job's columns (see :data:`UPDATABLE_COLUMNS`, plus ``result``) and ``updated_ms``.

        Returns:
            The job as it now is.

        Raises:
            NotFound: no such job.
            ValueError: a column that cannot be set, or a state unknown for this role.
        """
        _check_role(role)
        unknown = set(fields) - UPDATABLE_COLUMNS - JSON_COLUMNS
        if unknown:
            raise ValueError(f"update_job cannot set {sorted(unknown)}")
        if "state" in fields:
            _check_state(role, fields["state"])
        values = {k: (_json(v, k) if k in JSON_COLUMNS and v is not None else v) for k, v in fields.items()}
        # Column names come from the whitelist above, never from the caller's strings.
        assignments = "".join(f"{name} = ?, " for name in values)
        with self._db:
            cursor = self._db.execute(
                f"UPDATE jobs SET {assignments}updated_ms = ? WHERE job_id = ? AND role = ?",
                (*values.values(), now_ms, job_id, role),
            )
        if cursor.rowcount == 0:
            raise NotFound(f"no {role} job {job_id!r}")
        return self._must_get_job(job_id, role)

    def get_job(self, job_id: str, role: Role) -> JobRow | None:
        row = self._db.execute("SELECT * FROM jobs WHERE job_id = ? AND role = ?", (job_id, role)).fetchone()
        return None if row is None else _job(row)

    def _must_get_job(self, job_id: str, role: Role) -> JobRow:
        job = self.get_job(job_id, role)
        assert job is not None, "written a moment ago by this connection, and nothing deletes jobs"
        return job

    def list_jobs(
        self, role: Role | None = None, states: Iterable[str] | None = None, limit: int = 100
    ) -> list[JobRow]:
        """Jobs, newest first, optionally only one role and some states."""
        where: list[str] = ["1"]
        params: list[str] = []
        if role is not None:
            where.append("role = ?")
            params.append(role)
        if states is not None:
            wanted = list(states)
            where.append(f"state IN ({', '.join('?' * len(wanted))})" if wanted else "0")
            params.extend(wanted)
        rows = self._db.execute(
            f"SELECT * FROM jobs WHERE {' AND '.join(where)} ORDER BY created_ms DESC, rowid DESC LIMIT ?",
            (*params, limit),
        )
        return [_job(row) for row in rows]

    def job_counts(self) -> dict[tuple[str, str], int]:
        """How many jobs there are per (role, state) (for /metrics)."""
        rows = self._db.execute("SELECT role, state, COUNT(*) AS n FROM jobs GROUP BY role, state")
        return {(row["role"], row["state"]): row["n"] for row in rows}

    def termination_counts(self, role: Role) -> dict[str, int]:
        """How many of ``role``'s jobs ended with each termination reason (for /metrics)."""
        rows = self._db.execute(
            "SELECT termination, COUNT(*) AS n FROM jobs WHERE role = ? AND termination IS NOT NULL"
            " GROUP BY termination",
            (role,),
        )
        return {row["termination"]: row["n"] for row in rows}

    def unfinished_jobs(self, role: Role) -> list[JobRow]:
        """Jobs in ``role`` not yet completed, failed or cancelled, oldest first: what a restart must resume."""
        rows = self._db.execute(
            "SELECT * FROM jobs WHERE role = ? AND state NOT IN ('completed', 'failed', 'cancelled')"
            " ORDER BY created_ms, rowid",
            (role,),
        )
        return [_job(row) for row in rows]

    # ------------------------------------------------------------------------------------------------ attempts

    def add_attempt(self, job_id: str, *, provider: str, now_ms: int, role: Role = "client") -> int:
        """Record that the job was started (again) on ``provider``; bumps the job's ``attempts``.

        Returns:
            The attempt's number, from 1.

        Raises:
            NotFound: no such job.
        """
        with self._db:
            cursor = self._db.execute(
                "UPDATE jobs SET attempts = attempts + 1, updated_ms = ? WHERE job_id = ? AND role = ?",
                (now_ms, job_id, role),
            )
            if cursor.rowcount == 0:
                raise NotFound(f"no {role} job {job_id!r}")
            sql = "SELECT attempts FROM jobs WHERE job_id = ? AND role = ?"
            attempt: int = self._db.execute(sql, (job_id, role)).fetchone()[0]
            self._db.execute(
                "INSERT INTO job_attempts (job_id, role, attempt, provider, started_ms) VALUES (?, ?, ?, ?, ?)",
                (job_id, role, attempt, provider, now_ms),
            )
        return attempt

    def end_attempt(
        self, job_id: str, attempt: int, *, outcome: str, now_ms: int, reason: str | None = None, role: Role = "client"
    ) -> bool:
        """Record how an attempt ended. Returns False if it had already ended (the first ending stands).

        Raises:
            NotFound: no such attempt.
        """
        with self._db:
            cursor = self._db.execute(
                "UPDATE job_attempts SET ended_ms = ?, outcome = ?, reason = ?"
                " WHERE job_id = ? AND role = ? AND attempt = ? AND ended_ms IS NULL",
                (now_ms, outcome, reason, job_id, role, attempt),
            )
        if cursor.rowcount == 1:
            return True
        if self._db.execute(
            "SELECT 1 FROM job_attempts WHERE job_id = ? AND role = ? AND attempt = ?", (job_id, role, attempt)
        ).fetchone():
            return False
        raise NotFound(f"no attempt {attempt} of {role} job {job_id!r}")

    def attempts(self, job_id: str, role: Role = "client") -> list[AttemptRow]:
        rows = self._db.execute(
            "SELECT * FROM job_attempts WHERE job_id = ? AND role = ? ORDER BY attempt", (job_id, role)
        )
        return [AttemptRow(**dict(row)) for row in rows]

    # ------------------------------------------------------------------------------------------------ agreements

    def put_agreement(self, agreement: Agreement, role: Role, now_ms: int) -> bool:
        """Store a (verified) agreement. Returns False if it was already stored; the first copy stands."""
        _check_role(role)
        a = agreement
        with self._db:
            cursor = self._db.execute(
                "INSERT INTO agreements (hash, job_id, client, provider, role, blob, created_ms)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (hash) DO NOTHING",
                (terms_hash(a), a.job_id, a.client, a.provider, role, codec.encode(a), now_ms),
            )
        return cursor.rowcount == 1

    def get_agreement(self, agreement_hash: bytes) -> AgreementRow | None:
        row = self._db.execute("SELECT * FROM agreements WHERE hash = ?", (agreement_hash,)).fetchone()
        return None if row is None else _agreement(row)

    def agreements_for_job(self, job_id: str) -> list[AgreementRow]:
        rows = self._db.execute("SELECT * FROM agreements WHERE job_id = ? ORDER BY created_ms", (job_id,))
        return [_agreement(row) for row in rows]

    def consume_agreement(self, agreement_hash: bytes) -> bool:
        """Mark an agreement used, atomically. Returns False if it already was: the caller refuses a replay.

        Raises:
            NotFound: no agreement with this hash was ever stored.
        """
        with self._db:
            cursor = self._db.execute(
                "UPDATE agreements SET consumed = 1 WHERE hash = ? AND consumed = 0", (agreement_hash,)
            )
        if cursor.rowcount == 1:
            return True
        if self._db.execute("SELECT 1 FROM agreements WHERE hash = ?", (agreement_hash,)).fetchone() is None:
            raise NotFound(f"no agreement {agreement_hash.hex()[:16]}")
        return False

    # ------------------------------------------------------------------------------------------------ receipts

    def put_receipt(self, receipt: Receipt) -> bool:
        """Store a (verified) receipt. Returns False if this same receipt is already stored.

        Raises:
            DuplicateReceipt: a receipt with different terms is already stored for this job.
            StoreError: the cost does not fit in SQLite's 64-bit integers.
        """
        if receipt.cost > MAX_SQL_INT or receipt.issued_at > MAX_SQL_INT:
            raise StoreError(f"receipt for {receipt.job_id!r}: cost or time out of range")
        digest = terms_hash(receipt)
        row = (digest, receipt.job_id, receipt.client, receipt.provider, receipt.cost, receipt.issued_at)
        try:
            with self._db:
                self._db.execute(
                    "INSERT INTO receipts (hash, job_id, client, provider, cost, issued_ms, blob)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (*row, codec.encode(receipt)),
                )
        except sqlite3.IntegrityError:
            existing = self._db.execute("SELECT hash FROM receipts WHERE job_id = ?", (receipt.job_id,)).fetchone()
            if existing is not None and existing["hash"] == digest:
                return False
            raise DuplicateReceipt(f"job {receipt.job_id!r} already has a different receipt") from None
        return True

    def get_receipt(self, job_id: str) -> ReceiptRow | None:
        row = self._db.execute("SELECT * FROM receipts WHERE job_id = ?", (job_id,)).fetchone()
        return None if row is None else _receipt(row)

    def receipts(self, limit: int = 100) -> list[ReceiptRow]:
        """The newest receipts first."""
        rows = self._db.execute("SELECT * FROM receipts ORDER BY issued_ms DESC, rowid DESC LIMIT ?", (limit,))
        return [_receipt(row) for row in rows]

    def ledger(self, me: str, *, limit: int = 200) -> Ledger:
        """Credits earned and spent by peer ``me``, from receipts. A job ``me`` ran for itself nets to zero."""
        mine = "FROM receipts WHERE client = :me OR provider = :me"
        earned, spent = self._db.execute(
            "SELECT COALESCE(SUM(CASE WHEN client != :me THEN cost END), 0),"
            f" COALESCE(SUM(CASE WHEN provider != :me THEN cost END), 0) {mine}",
            {"me": me},
        ).fetchone()
        rows = self._db.execute(
            f"SELECT job_id, client, provider, cost, issued_ms {mine} ORDER BY issued_ms DESC, rowid DESC LIMIT :n",
            {"me": me, "n": limit},
        )
        entries = [
            LedgerEntry(
                job_id=row["job_id"],
                counterparty=row["client"] if row["provider"] == me else row["provider"],
                direction=_direction(row["client"], row["provider"], me),
                cost=row["cost"],
                issued_ms=row["issued_ms"],
            )
            for row in rows
        ]
        return Ledger(earned=earned, spent=spent, balance=earned - spent, entries=entries)

    # ------------------------------------------------------------------------------------------------ quotes

    def record_quote(
        self,
        *,
        job_id: str,
        provider: str,
        resource_class: str,
        cost: int,
        price_sheet: PriceSheet,
        load_permille: int,
        received_ms: int,
        outcome: str,
    ) -> int:
        """Remember a quote and what became of it; drops the oldest rows past the bound. Returns the row id.

        Args:
            cost: the worst-case cost of the quoted sheet (clamped to what SQLite holds: a peer chooses it).
            outcome: ``'accepted'``, ``'declined'`` or ``'rejected:<code>'``.
        """
        if outcome not in ("accepted", "declined") and not outcome.startswith("rejected:"):
            raise ValueError(f"quote outcome must be 'accepted', 'declined' or 'rejected:<code>', got {outcome!r}")
        sheet = _json(dataclasses.asdict(price_sheet), "price_sheet")
        with self._db:
            cursor = self._db.execute(
                "INSERT INTO quotes (job_id, provider, resource_class, cost, price_sheet, load_permille,"
                " received_ms, outcome) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, provider, resource_class, min(cost, MAX_SQL_INT), sheet, load_permille, received_ms, outcome),
            )
            row_id = cursor.lastrowid
            assert row_id is not None
            # Ids only grow (the newest row is never deleted), so this keeps the newest max_quotes rows.
            self._db.execute("DELETE FROM quotes WHERE id <= ?", (row_id - self._max_quotes,))
        return row_id

    def recent_quotes(self, limit: int = 200) -> list[QuoteRow]:
        """The newest quotes first."""
        rows = self._db.execute("SELECT * FROM quotes ORDER BY id DESC LIMIT ?", (limit,))
        return [QuoteRow(**{**dict(row), "price_sheet": json.loads(row["price_sheet"])}) for row in rows]

    def market_summary(self, since_ms: int) -> list[dict[str, Any]]:
        """Per resource class, the quotes received since ``since_ms``: how many, their costs, how many providers.

        Returns:
            Dicts with ``resource_class``, ``count``, ``accepted``, ``min_cost``, ``median_cost`` (the lower
            median, an integer), ``max_cost`` and ``providers`` (distinct), sorted by resource class.
        """
        rows = self._db.execute(
            "SELECT resource_class, provider, cost, outcome FROM quotes WHERE received_ms >= ?"
            " ORDER BY resource_class, cost",
            (since_ms,),
        )
        classes: dict[str, list[sqlite3.Row]] = {}
        for row in rows:
            classes.setdefault(row["resource_class"], []).append(row)
        return [
            {
                "resource_class": name,
                "count": len(quotes),
                "accepted": sum(q["outcome"] == "accepted" for q in quotes),
                "min_cost": quotes[0]["cost"],
                "median_cost": statistics.median_low([q["cost"] for q in quotes]),
                "max_cost": quotes[-1]["cost"],
                "providers": len({q["provider"] for q in quotes}),
            }
            for name, quotes in classes.items()
        ]
