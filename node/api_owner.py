"""Owner-control routes of the local API: the policy's state, pause/resume, and live policy changes."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Final

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from node.api import read_body
from protocol.owner import OwnerPolicyError

if TYPE_CHECKING:
    from node.owner import OwnerService

MAX_OWNER_BODY_BYTES: Final = 8 << 10  # a policy change is a few keys; 32 windows of 64 characters fit


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status)


async def _json_object(request: Request) -> dict[str, object] | JSONResponse:
    raw = await read_body(request, MAX_OWNER_BODY_BYTES)
    if raw is None:
        return _error(413, "too-large", f"owner settings are far less than {MAX_OWNER_BODY_BYTES} bytes")
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        return _error(400, "bad-json", "the body is not JSON")
    if not isinstance(body, dict):
        return _error(400, "bad-request", "expected a JSON object")
    return body


def owner_routes(owner: OwnerService) -> list[Route]:
    async def state(request: Request) -> Response:
        return JSONResponse(owner.api_state())

    async def pause(request: Request) -> Response:
        body = await _json_object(request)
        if isinstance(body, JSONResponse):
            return body
        drain = body.get("drain", False)
        if not isinstance(drain, bool) or set(body) - {"drain"}:
            return _error(400, "bad-request", 'pause takes {"drain": true|false}')
        return JSONResponse(await owner.pause(drain=drain))

    async def resume(request: Request) -> Response:
        return JSONResponse(await owner.resume())

    async def policy(request: Request) -> Response:
        body = await _json_object(request)
        if isinstance(body, JSONResponse):
            return body
        try:
            return JSONResponse(await owner.set_policy(body))
        except OwnerPolicyError as exc:
            return _error(400, "bad-policy", str(exc))

    return [
        Route("/v1/owner", state),
        Route("/v1/owner/pause", pause, methods=["POST"]),
        Route("/v1/owner/resume", resume, methods=["POST"]),
        Route("/v1/owner/policy", policy, methods=["POST"]),
    ]
