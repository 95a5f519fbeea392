"""Reputation routes of the local API: trust scores with their explanation, records, and rating a job."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Final

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from node.api import read_body
from protocol.errors import LocalProtocolError
from protocol.messages import Outcome

if TYPE_CHECKING:
    from node.reputation.service import ReputationService
    from node.store import Store
    from protocol.trust import TrustScore

MAX_RATING_BYTES: Final = 64 << 10


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status)


def score_json(s: TrustScore) -> dict[str, Any]:
    return {"peer_id": s.peer, "score": round(s.score, 4), "direct": s.direct, "transitive": round(s.transitive, 4),
            "evidence_count": s.evidence_count, "explanation": s.explanation}  # fmt: skip


def reputation_routes(service: ReputationService, store: Store) -> list[Route]:
    async def top(request: Request) -> Response:
        try:
            limit = max(1, min(int(request.query_params.get("top", "20")), 500))
        except ValueError:
            return _error(400, "bad-query", "top must be a number")
        ranked = [score_json(s) for s in service.table().ranked()[:limit]]
        return JSONResponse({"peers": ranked, "statistics": service.statistics()})

    async def peer(request: Request) -> Response:
        peer_id = request.path_params["peer"]
        if len(peer_id) > 64:
            return _error(400, "bad-query", "not a peer id")
        records = [
            {"rater": r.rater, "ratee": r.ratee, "outcome": r.outcome, "score": r.score, "time": r.time,
             "cost": r.cost, "receipt_hash": r.receipt_hash.hex(), "comment": r.comment}
            for r in service.records.rows(about=peer_id, limit=200)
        ]  # fmt: skip
        return JSONResponse(score_json(service.explain(peer_id)) | {"records": records})

    async def rate(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        raw = await read_body(request, MAX_RATING_BYTES)
        if raw is None:
            return _error(413, "too-large", "a rating is {score, comment}: far less than 64 KiB")
        try:
            body = json.loads(raw)
            stars = body["score"]
            comment = str(body.get("comment", ""))
            if isinstance(stars, bool) or not isinstance(stars, int) or not 0 <= stars <= 5:
                raise ValueError("score must be a whole number of stars from 0 to 5")
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            return _error(400, "bad-rating", f"expected {{score: 0-5, comment}}: {exc}")
        row = store.get_receipt(job_id)
        if row is None:
            return _error(404, "not-found", "no receipt for that job: only finished jobs can be rated")
        me = service.identity.peer_id
        if me not in (row.client, row.provider):
            return _error(403, "not-a-party", "this node was not part of that job")
        if stars >= 3:
            outcome = Outcome.SUCCESS
        else:
            outcome = Outcome.PROVIDER_FAILURE if row.client == me else Outcome.CLIENT_FAILURE
        try:
            verified = await service.rate(receipt=row.receipt, outcome=outcome, score=stars * 20, comment=comment)
        except LocalProtocolError as exc:
            return _error(400, "bad-rating", str(exc))
        if verified is None:
            return _error(400, "bad-rating", "this node ran that job for itself: there is nobody to rate")
        record = verified.record
        return JSONResponse({"job_id": job_id, "ratee": record.ratee, "score": record.score,
                             "outcome": record.outcome.value, "comment": record.comment})  # fmt: skip

    return [
        Route("/v1/reputation", top, methods=["GET"]),
        Route("/v1/reputation/{peer}", peer, methods=["GET"]),
        Route("/v1/jobs/{job_id}/rate", rate, methods=["POST"]),
    ]
