"""Job, market and ledger routes of the local API (the client side of the market)."""

from __future__ import annotations

import base64
import json
import math
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Final

import trio
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from node.api import read_body
from node.market.queue import QueueFull
from node.market.requests import BadSubmission, parse_submission
from protocol import codec
from protocol.messages import file_name_ok

if TYPE_CHECKING:
    from node.market.jobs import JobManager
    from node.store import JobRow, Store

TERMINAL: Final = frozenset({"completed", "failed", "cancelled"})
MAX_BODY_BYTES: Final = 96 << 20
MAX_WAIT_S: Final = 300.0
MAX_LIST_JOBS: Final = 1000


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status)


def job_json(store: Store, row: JobRow) -> dict[str, Any]:
    receipt = store.get_receipt(row.job_id)
    return {
        "job_id": row.job_id,
        "role": row.role,
        "state": row.state,
        "created_ms": row.created_ms,
        "updated_ms": row.updated_ms,
        "command": row.request.get("command"),
        "provider": row.provider,
        "client": row.client,
        "attempts": [
            {
                "attempt": a.attempt,
                "provider": a.provider,
                "outcome": a.outcome,
                "reason": a.reason,
                "started_ms": a.started_ms,
                "ended_ms": a.ended_ms,
            }
            for a in store.attempts(row.job_id, row.role)  # type: ignore[arg-type]
        ],
        "exit_status": row.exit_status,
        "termination": row.termination,
        "error": row.error,
        "cost": row.cost,
        "result": row.result,
        "receipt": None if receipt is None else receipt_json(receipt.receipt),
    }


def receipt_json(receipt: Any) -> dict[str, Any]:
    plain = codec.to_plain(receipt)
    assert isinstance(plain, dict)
    out = {k: (v.hex() if isinstance(v, bytes) else v) for k, v in plain.items()}
    out["wire_b64"] = base64.b64encode(codec.encode(receipt)).decode()
    return out


def job_routes(jobs: JobManager, store: Store, me: str) -> list[Route]:
    def find(job_id: str) -> JobRow | None:
        return store.get_job(job_id, "client") or store.get_job(job_id, "provider")

    async def submit(request: Request) -> Response:
        body = await read_body(request, MAX_BODY_BYTES)
        if body is None:
            return _error(413, "too-large", "submission over 96 MiB; pass large inputs by path")
        try:
            submission = parse_submission(json.loads(body))
        except (ValueError, RecursionError, BadSubmission) as exc:  # RecursionError: JSON nested too deeply
            return _error(400, "bad-submission", str(exc))
        try:
            job_id = await jobs.submit(submission)
        except QueueFull as exc:
            return _error(429, "queue-full", str(exc))
        except ValueError as exc:
            return _error(409, "conflict", str(exc))
        except OSError as exc:  # an input path that cannot be read (or copied) after all
            return _error(400, "bad-submission", f"could not stage the inputs: {exc}")
        return JSONResponse({"job_id": job_id}, status_code=201)

    async def list_jobs(request: Request) -> Response:
        text = request.query_params.get("limit", "") or "100"
        if not (text.isascii() and text.isdigit() and len(text) <= 9):
            return _error(400, "bad-query", f"limit must be a whole number from 1 to {MAX_LIST_JOBS}")
        limit = max(1, min(int(text), MAX_LIST_JOBS))
        return JSONResponse({"jobs": [job_json(store, r) for r in store.list_jobs(limit=limit)]})

    async def get_job(request: Request) -> Response:
        row = find(request.path_params["job_id"])
        if row is None:
            return _error(404, "not-found", "no such job")
        return JSONResponse(job_json(store, row))

    async def wait_job(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        try:
            seconds = min(float(request.query_params.get("timeout", "30")), MAX_WAIT_S)
        except ValueError:
            seconds = math.nan
        if not seconds >= 0:  # NaN and negative timeouts make trio raise
            return _error(400, "bad-query", "timeout must be a number of seconds, at least 0")
        if find(job_id) is None:
            return _error(404, "not-found", "no such job")
        await jobs.wait(job_id, seconds=seconds)
        row = find(job_id)
        assert row is not None
        return JSONResponse(job_json(store, row))

    async def cancel_job(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        if store.get_job(job_id, "client") is None:
            return _error(404, "not-found", "no such job submitted by this node")
        cancelled = await jobs.cancel(job_id)
        return JSONResponse({"job_id": job_id, "cancelled": cancelled})

    async def logs(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        stream = request.query_params.get("stream", "stdout")
        if stream not in ("stdout", "stderr") or find(job_id) is None:
            return _error(404, "not-found", "no such job or log stream (stdout, stderr)")
        follow = request.query_params.get("follow") in ("1", "true")
        path = jobs.job_dir(job_id) / stream

        async def body() -> AsyncIterator[bytes]:
            offset = 0
            while True:
                if path.exists():
                    if path.stat().st_size < offset:  # a new attempt restarted the log
                        offset = 0
                    with path.open("rb") as f:
                        f.seek(offset)
                        data = f.read()
                    if data:
                        offset += len(data)
                        yield data
                row = find(job_id)
                if not follow or row is None or row.state in TERMINAL:
                    return
                with trio.move_on_after(1.0):
                    await jobs.changed(job_id)

        return StreamingResponse(body(), media_type="application/octet-stream")

    async def output(request: Request) -> Response:
        job_id, name = request.path_params["job_id"], request.path_params["name"]
        path = jobs.job_dir(job_id) / "outputs" / name
        if not file_name_ok(name) or not path.is_file():
            return _error(404, "not-found", "no such output")
        return FileResponse(path)

    async def market(request: Request) -> Response:
        quotes = store.recent_quotes(limit=50)
        return JSONResponse({
            "summary": store.market_summary(since_ms=0),
            "recent": [{"job_id": q.job_id, "provider": q.provider, "resource_class": q.resource_class,
                        "cost": q.cost, "load_permille": q.load_permille, "received_ms": q.received_ms,
                        "outcome": q.outcome, "price_sheet": q.price_sheet} for q in quotes],
        })  # fmt: skip

    async def ledger(request: Request) -> Response:
        led = store.ledger(me)
        return JSONResponse({
            "peer_id": me, "earned": led.earned, "spent": led.spent, "balance": led.balance,
            "entries": [{"job_id": e.job_id, "counterparty": e.counterparty, "direction": e.direction,
                         "cost": e.cost, "issued_ms": e.issued_ms} for e in led.entries],
        })  # fmt: skip

    return [
        Route("/v1/jobs", submit, methods=["POST"]),
        Route("/v1/jobs", list_jobs, methods=["GET"]),
        Route("/v1/jobs/{job_id}", get_job, methods=["GET"]),
        Route("/v1/jobs/{job_id}/wait", wait_job, methods=["GET"]),
        Route("/v1/jobs/{job_id}/cancel", cancel_job, methods=["POST"]),
        Route("/v1/jobs/{job_id}/logs", logs, methods=["GET"]),
        Route("/v1/jobs/{job_id}/outputs/{name}", output, methods=["GET"]),
        Route("/v1/market", market, methods=["GET"]),
        Route("/v1/ledger", ledger, methods=["GET"]),
    ]
