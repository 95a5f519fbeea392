"""The reputation_records table (created by the store's migrations)."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Final

from protocol import codec
from protocol.messages import Outcome
from protocol.reputation import RecordBundle, VerifiedRecord
from protocol.trust import Evidence

MAX_PAGE: Final = 500


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordRow:
    id: bytes
    rater: str
    ratee: str
    receipt_hash: bytes
    outcome: str
    score: int
    time: int
    cost: int
    received_ms: int
    comment: str


class RecordStore:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def put(self, verified: VerifiedRecord, *, received_ms: int) -> bool:
        """Store a verified record. Returns True if it is new, or newer than the one this rater had for that job."""
        r = verified.record
        row = self._db.execute("SELECT time FROM reputation_records WHERE id = ?", (verified.id,)).fetchone()
        if row is not None and row[0] >= r.time:
            return False
        with self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO reputation_records"
                " (id, rater, ratee, receipt_hash, outcome, score, time, cost, bundle, received_ms)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (verified.id, r.rater, r.ratee, r.receipt_hash, r.outcome.value, r.score, r.time, verified.cost,
                 codec.encode(verified.bundle), received_ms),
            )  # fmt: skip
        return True

    def page(self, *, since: int, after_id: bytes, limit: int) -> tuple[list[RecordBundle], bool]:
        """Bundles ordered by (time, id) from (since, after_id) on; and whether more follow."""
        limit = max(1, min(limit, MAX_PAGE))
        rows = self._db.execute(
            "SELECT bundle FROM reputation_records WHERE time > ? OR (time = ? AND id > ?) ORDER BY time, id LIMIT ?",
            (since, since, after_id, limit + 1),
        ).fetchall()
        bundles = [codec.decode(row[0], RecordBundle) for row in rows[:limit]]
        return bundles, len(rows) > limit

    def evidence(self, *, limit: int = 100_000) -> list[Evidence]:
        """What trust is computed from, newest first: the record's columns only (no bundle to decode, which was
        most of the cost of recomputing trust after each new record)."""
        rows = self._db.execute(
            "SELECT rater, ratee, outcome, score, time, cost, receipt_hash FROM reputation_records"
            " ORDER BY time DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [Evidence(rater=r[0], ratee=r[1], outcome=Outcome(r[2]), score=r[3], time=r[4], cost=r[5],
                         receipt_hash=r[6]) for r in rows]  # fmt: skip

    def time_of(self, record_id: bytes) -> int | None:
        row = self._db.execute("SELECT time FROM reputation_records WHERE id = ?", (record_id,)).fetchone()
        return None if row is None else int(row[0])

    def newest_time(self) -> int:
        row = self._db.execute("SELECT MAX(time) FROM reputation_records").fetchone()
        return int(row[0] or 0)

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM reputation_records").fetchone()[0])

    def rows(self, *, about: str | None = None, limit: int = 100_000) -> list[RecordRow]:
        query = (
            "SELECT id, rater, ratee, receipt_hash, outcome, score, time, cost, received_ms, bundle"
            " FROM reputation_records"
        )
        params: tuple[object, ...] = ()
        if about is not None:
            query += " WHERE ratee = ? OR rater = ?"
            params = (about, about)
        rows = self._db.execute(query + " ORDER BY time DESC LIMIT ?", (*params, limit)).fetchall()
        out = []
        for row in rows:
            bundle = codec.decode(row[9], RecordBundle)
            out.append(RecordRow(id=row[0], rater=row[1], ratee=row[2], receipt_hash=row[3], outcome=row[4],
                                 score=row[5], time=row[6], cost=row[7], received_ms=row[8],
                                 comment=bundle.record.comment))  # fmt: skip
        return out
