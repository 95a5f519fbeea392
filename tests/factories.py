"""Builders of valid messages for tests (one per registered type)."""

from __future__ import annotations

import hashlib
import itertools

from protocol.identity import Identity
from protocol.messages import (
    Accept,
    Agreement,
    CapacityAd,
    Chunk,
    ChunkKind,
    Counter,
    FileRef,
    GpuSpec,
    JobAccepted,
    JobResult,
    JobSpec,
    Limits,
    Outcome,
    PriceSheet,
    Quote,
    QuoteRequest,
    Receipt,
    ReceiptQuery,
    Reject,
    RejectCode,
    ReputationRecord,
    Resources,
    Termination,
    Usage,
)

NOW = 1_790_000_000_000  # a fixed "now" in Unix ms
_nonces = itertools.count(1)


def nonce() -> bytes:
    return next(_nonces).to_bytes(16, "big")


def digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


ALICE = Identity.from_seed(b"a" * 32)
BOB = Identity.from_seed(b"b" * 32)
MALLORY = Identity.from_seed(b"m" * 32)

SHEET = PriceSheet(start_fee=10, per_cpu_second=5, per_gib_second=2, per_gpu_second=100)


def capacity_ad(peer: Identity = BOB, seq: int = 1) -> CapacityAd:
    return CapacityAd(
        peer=peer.peer_id,
        seq=seq,
        cpus=8,
        memory_bytes=32 << 30,
        disk_bytes=500 << 30,
        gpus=(GpuSpec(model="NVIDIA GeForce RTX 4090", memory_bytes=24 << 30),),
        sandbox_tier="bwrap",
        price_sheet=SHEET,
        load_permille=250,
        addrs=("/ip4/127.0.0.1/tcp/4001",),
    )


def quote_request(client: Identity = ALICE, max_price: int = 100_000) -> QuoteRequest:
    return QuoteRequest(
        job_id="job-1",
        client=client.peer_id,
        resources=Resources(cpus=1, memory_bytes=1 << 30),
        limits=Limits(cpu_seconds=60, wall_seconds=60, memory_bytes=1 << 30),
        max_price=max_price,
        deadline=NOW + 600_000,
    )


def all_messages() -> list[object]:
    """One valid instance of every top-level message type."""
    request = quote_request()
    quote = Quote(
        job_id="job-1",
        provider=BOB.peer_id,
        request_hash=digest("req"),
        price_sheet=SHEET,
        valid_until=NOW + 30_000,
        load_permille=100,
    )
    usage = Usage(cpu_ms=1500, wall_ms=2000, peak_memory_bytes=64 << 20)
    return [
        capacity_ad(),
        request,
        quote,
        Counter(job_id="job-1", client=ALICE.peer_id, quote_hash=digest("q"), price_sheet=SHEET, round=1),
        Accept(job_id="job-1", client=ALICE.peer_id, quote_hash=digest("q"), client_signature=b"s" * 64),
        Reject(job_id="job-1", peer=BOB.peer_id, code=RejectCode.BUSY, message="try later", retryable=True),
        Agreement(
            job_id="job-1",
            client=ALICE.peer_id,
            provider=BOB.peer_id,
            request_hash=digest("req"),
            quote_hash=digest("q"),
            price_sheet=SHEET,
            resources=request.resources,
            limits=request.limits,
            max_cost=100_000,
        ),
        JobSpec(
            job_id="job-1",
            client=ALICE.peer_id,
            agreement_hash=digest("agr"),
            command=("python3", "-c", "print(6*7)"),
            env={"LANG": "C.UTF-8"},
            inputs=(FileRef(name="in.txt", sha256=digest("in"), size=3),),
            outputs=("out.txt",),
        ),
        JobResult(
            job_id="job-1",
            provider=BOB.peer_id,
            exit_status=0,
            termination=Termination.EXITED,
            outputs=(FileRef(name="out.txt", sha256=digest("out"), size=2),),
            usage=usage,
        ),
        Receipt(
            job_id="job-1",
            client=ALICE.peer_id,
            provider=BOB.peer_id,
            agreement_hash=digest("agr"),
            result_hash=digest("res"),
            usage=usage,
            cost=42,
            issued_at=NOW,
        ),
        ReputationRecord(
            rater=ALICE.peer_id,
            ratee=BOB.peer_id,
            receipt_hash=digest("rcpt"),
            outcome=Outcome.SUCCESS,
            score=90,
            time=NOW,
        ),
        Chunk(job_id="job-1", kind=ChunkKind.STDOUT, data=b"42\n"),
        JobAccepted(job_id="job-1", provider=BOB.peer_id),
        ReceiptQuery(job_id="job-1"),
    ]
