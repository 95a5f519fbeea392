"""node.store: the SQLite store survives restarts, refuses replays and double receipts, and keeps the ledger."""

import dataclasses
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from node.store import (
    MIGRATIONS,
    DuplicateJob,
    DuplicateReceipt,
    NotFound,
    Store,
    StoreError,
    migrate,
)
from protocol.cosign import sign_as, terms_hash
from protocol.identity import Identity
from protocol.messages import Agreement, PriceSheet, Receipt
from tests.factories import ALICE, BOB, NOW, all_messages

ROOT = Path(__file__).resolve().parent.parent
REQUEST = {
    "command": ["python3", "-c", "print(6*7)"],
    "env": {"LANG": "C.UTF-8"},
    "resources": {"cpus": 1, "memory_bytes": 1 << 30},
    "limits": {"wall_seconds": 60},
    "max_price": 500,
    "inputs": [{"name": "in.txt", "sha256": "ab" * 32, "size": 3}],
    "outputs": ["out.txt"],
}


def _template(cls):
    return next(m for m in all_messages() if isinstance(m, cls))


def signed_agreement(**changes) -> Agreement:
    agreement = dataclasses.replace(_template(Agreement), **changes)
    return sign_as(BOB, sign_as(ALICE, agreement, "client"), "provider")


def signed_receipt(
    job_id: str = "job-1", client: Identity = ALICE, provider: Identity = BOB, cost: int = 42, issued_at: int = NOW
) -> Receipt:
    receipt = dataclasses.replace(
        _template(Receipt),
        job_id=job_id,
        client=client.peer_id,
        provider=provider.peer_id,
        cost=cost,
        issued_at=issued_at,
    )
    return sign_as(provider, sign_as(client, receipt, "client"), "provider")


def quote(store: Store, **changes) -> int:
    values = {
        "job_id": "job-1",
        "provider": BOB.peer_id,
        "resource_class": "cpu",
        "cost": 100,
        "price_sheet": PriceSheet(start_fee=10, per_cpu_second=5),
        "load_permille": 250,
        "received_ms": NOW,
        "outcome": "declined",
    } | changes
    return store.record_quote(**values)


@pytest.fixture
def store(tmp_path):
    with Store.open(tmp_path / "coop.db") as store:
        yield store


# ---------------------------------------------------------------------------------------------------- opening


def test_open_sets_wal_and_connection_pragmas(tmp_path, store):
    db = store._db
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert db.execute("PRAGMA busy_timeout").fetchone()[0] > 0
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    # WAL is a property of the file: a second connection sees it too.
    other = sqlite3.connect(tmp_path / "coop.db")
    try:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        other.close()


def test_the_file_is_owner_only(tmp_path, store):
    assert stat.S_IMODE((tmp_path / "coop.db").stat().st_mode) == 0o600


def test_a_file_that_is_not_a_database_is_refused(tmp_path):
    path = tmp_path / "coop.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="not a database"):
        Store.open(path)


def test_a_missing_directory_is_a_store_error(tmp_path):
    with pytest.raises(StoreError, match="cannot open or create"):
        Store.open(tmp_path / "missing" / "coop.db")


def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "coop.db"
    Store.open(path).close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(StoreError, match="newer than this node"):
        Store.open(path)


def test_migrations_run_once_and_in_order(tmp_path):
    path = tmp_path / "coop.db"
    with Store.open(path) as store:
        store.create_job("job-1", "client", request=REQUEST, now_ms=NOW)
    later = (*MIGRATIONS, ("CREATE TABLE ratings (job_id TEXT PRIMARY KEY, score INTEGER)",))
    db = sqlite3.connect(path)
    try:
        assert migrate(db, later) == len(later)
        assert migrate(db, later) == len(later)  # nothing left to run: no "table already exists"
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(later)
        db.execute("INSERT INTO ratings VALUES ('job-1', 90)")
        assert db.execute("SELECT count(*) FROM jobs").fetchone()[0] == 1
    finally:
        db.close()


def test_a_closed_store_refuses_calls(tmp_path):
    with Store.open(tmp_path / "coop.db") as store:
        pass
    with pytest.raises(sqlite3.ProgrammingError):
        store.get_job("job-1", "client")


def test_everything_survives_close_and_reopen(tmp_path):
    path = tmp_path / "coop.db"
    agreement, receipt = signed_agreement(), signed_receipt()
    with Store.open(path) as store:
        store.create_job("job-1", "client", request=REQUEST, now_ms=NOW)
        store.add_attempt("job-1", provider=BOB.peer_id, now_ms=NOW + 1)
        store.put_agreement(agreement, "client", NOW + 2)
        store.consume_agreement(terms_hash(agreement))
        store.put_receipt(receipt)
        quote(store)
    with Store.open(path) as store:
        job = store.get_job("job-1", "client")
        assert job is not None
        assert job.request == REQUEST
        assert job.attempts == 1
        assert [a.provider for a in store.attempts("job-1")] == [BOB.peer_id]
        stored = store.get_agreement(terms_hash(agreement))
        assert stored is not None
        assert stored.consumed
        assert stored.agreement == agreement
        assert store.consume_agreement(terms_hash(agreement)) is False  # a restart does not reopen replays
        assert store.put_receipt(receipt) is False
        assert store.ledger(ALICE.peer_id).spent == 42
        assert len(store.recent_quotes()) == 1


def test_a_killed_daemon_loses_no_committed_write(tmp_path):
    path = tmp_path / "coop.db"
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from node.store import Store\n"
        "store = Store.open(Path(sys.argv[1]))\n"
        "store.create_job('job-1', 'client', request={'command': ['true']}, now_ms=1)\n"
        "os._exit(0)  # no close, no checkpoint: as if killed\n"
    )
    subprocess.run([sys.executable, "-c", script, str(path)], cwd=ROOT, check=True, timeout=60)
    assert (tmp_path / "coop.db-wal").stat().st_size > 0  # the write is only in the log, not yet checkpointed
    with Store.open(path) as store:
        job = store.get_job("job-1", "client")
        assert job is not None
        assert job.request == {"command": ["true"]}


# ---------------------------------------------------------------------------------------------------- jobs


def test_job_round_trip(store):
    created = store.create_job("job-1", "client", request=REQUEST, now_ms=NOW)
    assert created.state == "queued"
    assert created.created_ms == created.updated_ms == NOW
    assert created.attempts == 0
    assert created.result is None
    assert created.finished is False
    assert store.get_job("job-1", "client") == created
    assert store.get_job("job-1", "provider") is None
    result = {"outputs": {"out.txt": {"sha256": "cd" * 32, "size": 2}}, "usage": {"cpu_ms": 1500}}
    updated = store.update_job(
        "job-1",
        "client",
        NOW + 5,
        state="completed",
        provider=BOB.peer_id,
        exit_status=0,
        termination="exited",
        cost=42,
        result=result,
    )
    assert updated == store.get_job("job-1", "client")
    assert (updated.state, updated.provider, updated.exit_status, updated.termination) == (
        "completed",
        BOB.peer_id,
        0,
        "exited",
    )
    assert (updated.cost, updated.result, updated.created_ms, updated.updated_ms) == (42, result, NOW, NOW + 5)
    assert updated.finished


def test_provider_jobs_start_running_and_both_roles_coexist(store):
    store.create_job("job-1", "client", request=REQUEST, now_ms=NOW)
    job = store.create_job("job-1", "provider", request=REQUEST, now_ms=NOW, client=ALICE.peer_id)
    assert (job.state, job.client) == ("running", ALICE.peer_id)
    with pytest.raises(DuplicateJob):
        store.create_job("job-1", "provider", request=REQUEST, now_ms=NOW)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"updated_ms": 0}, "cannot set"),
        ({"rowid": 1}, "cannot set"),
        ({"created_ms": 0}, "cannot set"),
        ({"request": {}}, "cannot set"),
        ({"attempts": 5}, "cannot set"),
        ({"state = 'completed', error": "x"}, "cannot set"),
        ({"state": "negotiating"}, "not a provider job state"),
        ({"result": {"digest": b"raw bytes"}}, "not JSON-serialisable"),
    ],
)
def test_update_job_refuses_what_it_may_not_set(store, fields, message):
    store.create_job("job-1", "provider", request=REQUEST, now_ms=NOW)
    with pytest.raises(ValueError, match=message):
        store.update_job("job-1", "provider", now_ms=NOW + 1, **fields)
    assert store.get_job("job-1", "provider").updated_ms == NOW


def test_create_and_update_check_their_arguments(store):
    with pytest.raises(ValueError, match="role"):
        store.create_job("job-1", "broker", request=REQUEST, now_ms=NOW)
    with pytest.raises(ValueError, match="not a client job state"):
        store.create_job("job-1", "client", request=REQUEST, now_ms=NOW, state="done")
    with pytest.raises(ValueError, match="JSON"):
        store.create_job("job-1", "client", request={"sha256": b"\x00" * 32}, now_ms=NOW)
    with pytest.raises(NotFound):
        store.update_job("job-404", "client", now_ms=NOW, state="failed")
    assert store.list_jobs() == []


def test_list_jobs_newest_first_with_filters(store):
    for i, (role, state) in enumerate(
        [("client", "queued"), ("provider", "running"), ("client", "failed"), ("client", "running")]
    ):
        store.create_job(f"job-{i}", role, request=REQUEST, now_ms=NOW + i, state=state)
    assert [j.job_id for j in store.list_jobs()] == ["job-3", "job-2", "job-1", "job-0"]
    assert [j.job_id for j in store.list_jobs(role="client")] == ["job-3", "job-2", "job-0"]
    assert [j.job_id for j in store.list_jobs(states=["running"])] == ["job-3", "job-1"]
    assert [j.job_id for j in store.list_jobs(role="client", states={"queued", "failed"})] == ["job-2", "job-0"]
    assert store.list_jobs(states=[]) == []
    assert [j.job_id for j in store.list_jobs(limit=2)] == ["job-3", "job-2"]


def test_unfinished_jobs_are_what_a_restart_resumes(store):
    states = ["queued", "negotiating", "running", "completed", "failed", "cancelled"]
    for i, state in enumerate(states):
        store.create_job(f"c-{i}", "client", request=REQUEST, now_ms=NOW + i, state=state)
    store.create_job("p-0", "provider", request=REQUEST, now_ms=NOW)
    store.create_job("p-1", "provider", request=REQUEST, now_ms=NOW, state="completed")
    assert [j.job_id for j in store.unfinished_jobs("client")] == ["c-0", "c-1", "c-2"]
    assert [j.job_id for j in store.unfinished_jobs("provider")] == ["p-0"]
    store.update_job("c-2", "client", now_ms=NOW + 10, state="cancelled")
    assert [j.job_id for j in store.unfinished_jobs("client")] == ["c-0", "c-1"]


def test_every_attempt_is_recorded(store):
    store.create_job("job-1", "client", request=REQUEST, now_ms=NOW)
    assert store.add_attempt("job-1", provider=BOB.peer_id, now_ms=NOW + 1) == 1
    assert store.end_attempt("job-1", 1, outcome="failed", reason="provider vanished", now_ms=NOW + 2)
    assert store.end_attempt("job-1", 1, outcome="completed", now_ms=NOW + 3) is False  # the first ending stands
    assert store.add_attempt("job-1", provider=ALICE.peer_id, now_ms=NOW + 4) == 2
    first, second = store.attempts("job-1")
    assert (first.attempt, first.provider, first.started_ms, first.ended_ms) == (1, BOB.peer_id, NOW + 1, NOW + 2)
    assert (first.outcome, first.reason) == ("failed", "provider vanished")
    assert (second.attempt, second.provider, second.ended_ms, second.outcome) == (2, ALICE.peer_id, None, None)
    job = store.get_job("job-1", "client")
    assert (job.attempts, job.updated_ms) == (2, NOW + 4)
    assert store.attempts("job-1", role="provider") == []
    with pytest.raises(NotFound):
        store.add_attempt("job-404", provider=BOB.peer_id, now_ms=NOW)
    with pytest.raises(NotFound):
        store.end_attempt("job-1", 3, outcome="failed", now_ms=NOW)


# ---------------------------------------------------------------------------------------------------- agreements


def test_agreement_round_trip(store):
    agreement = signed_agreement()
    assert store.put_agreement(agreement, "provider", NOW) is True
    assert store.put_agreement(agreement, "client", NOW + 1) is False  # a self-run job stores it once
    row = store.get_agreement(terms_hash(agreement))
    assert row is not None
    assert (row.job_id, row.client, row.provider, row.role, row.created_ms) == (
        "job-1",
        ALICE.peer_id,
        BOB.peer_id,
        "provider",
        NOW,
    )
    assert row.agreement == agreement
    assert row.consumed is False
    other = signed_agreement(max_cost=7)
    store.put_agreement(other, "provider", NOW + 2)
    assert [a.agreement for a in store.agreements_for_job("job-1")] == [agreement, other]
    assert store.get_agreement(b"\x00" * 32) is None


def test_consume_agreement_refuses_a_replay(store):
    agreement = signed_agreement()
    store.put_agreement(agreement, "provider", NOW)
    assert store.consume_agreement(terms_hash(agreement)) is True
    assert store.consume_agreement(terms_hash(agreement)) is False
    assert store.get_agreement(terms_hash(agreement)).consumed is True
    with pytest.raises(NotFound):
        store.consume_agreement(b"\x01" * 32)


# ---------------------------------------------------------------------------------------------------- receipts


def test_put_receipt_is_idempotent_and_refuses_a_second_receipt(store):
    receipt = signed_receipt()
    assert store.put_receipt(receipt) is True
    assert store.put_receipt(receipt) is False
    with pytest.raises(DuplicateReceipt):
        store.put_receipt(signed_receipt(cost=43))
    row = store.get_receipt("job-1")
    assert row is not None
    assert (row.hash, row.cost, row.issued_ms, row.receipt) == (terms_hash(receipt), 42, NOW, receipt)
    assert store.get_receipt("job-2") is None


def test_receipts_newest_first(store):
    for i in range(3):
        store.put_receipt(signed_receipt(job_id=f"job-{i}", issued_at=NOW + i))
    assert [r.job_id for r in store.receipts()] == ["job-2", "job-1", "job-0"]
    assert [r.job_id for r in store.receipts(limit=1)] == ["job-2"]


def test_a_receipt_cost_sqlite_cannot_hold_is_refused(store):
    with pytest.raises(StoreError, match="out of range"):
        store.put_receipt(signed_receipt(cost=1 << 63))
    assert store.receipts() == []


def test_ledger_for_client_provider_and_self(store):
    store.put_receipt(signed_receipt(job_id="job-1", client=ALICE, provider=BOB, cost=42, issued_at=NOW))
    store.put_receipt(signed_receipt(job_id="job-2", client=BOB, provider=ALICE, cost=100, issued_at=NOW + 1))
    store.put_receipt(signed_receipt(job_id="job-3", client=ALICE, provider=ALICE, cost=7, issued_at=NOW + 2))
    alice = store.ledger(ALICE.peer_id)
    assert (alice.earned, alice.spent, alice.balance) == (100, 42, 58)
    assert [(e.job_id, e.counterparty, e.direction, e.cost, e.issued_ms) for e in alice.entries] == [
        ("job-3", ALICE.peer_id, "self", 7, NOW + 2),
        ("job-2", BOB.peer_id, "earned", 100, NOW + 1),
        ("job-1", BOB.peer_id, "spent", 42, NOW),
    ]
    bob = store.ledger(BOB.peer_id)
    assert (bob.earned, bob.spent, bob.balance) == (42, 100, -58)
    assert [(e.job_id, e.direction) for e in bob.entries] == [("job-2", "spent"), ("job-1", "earned")]
    limited = store.ledger(ALICE.peer_id, limit=1)
    assert (limited.balance, len(limited.entries)) == (58, 1)  # totals cover every receipt
    nobody = store.ledger("12D3KooWnobody")
    assert (nobody.earned, nobody.spent, nobody.balance, nobody.entries) == (0, 0, 0, [])


# ---------------------------------------------------------------------------------------------------- quotes


def test_quote_round_trip(store):
    quote_id = quote(store, outcome="rejected:above-max-price", cost=1 << 80)
    (row,) = store.recent_quotes()
    assert row.id == quote_id
    assert row.cost == (1 << 63) - 1  # a peer's absurd sheet is clamped, not a crash
    assert row.price_sheet == {"start_fee": 10, "per_cpu_second": 5, "per_gib_second": 0, "per_gpu_second": 0}
    assert (row.outcome, row.load_permille, row.received_ms) == ("rejected:above-max-price", 250, NOW)
    with pytest.raises(ValueError, match="outcome"):
        quote(store, outcome="maybe")


def test_quotes_table_is_bounded(tmp_path):
    with Store.open(tmp_path / "coop.db", max_quotes=5) as store:
        ids = [quote(store, received_ms=NOW + i) for i in range(12)]
        assert [q.id for q in store.recent_quotes(limit=100)] == ids[::-1][:5]
        assert store._db.execute("SELECT count(*) FROM quotes").fetchone()[0] == 5


def test_market_summary_per_resource_class(store):
    quote(store, resource_class="cpu", cost=1, received_ms=NOW - 1)  # before the window
    for cost, provider, outcome in [(300, BOB, "declined"), (100, ALICE, "accepted"), (200, BOB, "declined")]:
        quote(store, resource_class="cpu", cost=cost, provider=provider.peer_id, outcome=outcome)
    quote(store, resource_class="gpu", cost=5000, provider=BOB.peer_id, outcome="rejected:busy")
    quote(store, resource_class="gpu", cost=9000, provider=BOB.peer_id)
    assert store.market_summary(since_ms=NOW) == [
        {
            "resource_class": "cpu",
            "count": 3,
            "accepted": 1,
            "min_cost": 100,
            "median_cost": 200,
            "max_cost": 300,
            "providers": 2,
        },
        {
            "resource_class": "gpu",
            "count": 2,
            "accepted": 0,
            "min_cost": 5000,
            "median_cost": 5000,
            "max_cost": 9000,
            "providers": 1,
        },
    ]
    assert store.market_summary(since_ms=NOW + 1) == []
