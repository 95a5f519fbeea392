"""The local API: HTTP+JSON on 127.0.0.1, bearer token from api.json on every request.

Served by hypercorn's trio worker with starlette routing. The handlers only translate HTTP to calls on the
:class:`ApiBackend` (the daemon) and back; they hold no state of their own.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from protocol.messages import runtime_name_ok

API_VERSION: Final = "v1"
TOKEN_BYTES: Final = 32
MAX_INT_PARAM_CHARS: Final = 20  # int() of a longer digit string is slow, and past 4300 digits a ValueError

log = logging.getLogger(__name__)
# The client keeps idle connections for node.client.KEEPALIVE_EXPIRY_S; the server must hold them longer (hypercorn's
# default is 5 s, and a client reusing a connection the server just closed sees "server disconnected").
KEEPALIVE_S: Final = 75.0


class BadQuery(ValueError):
    """A request's parameters are invalid (the caller's fault: HTTP 400)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class FindQuery:
    cpus: int = 1
    memory_bytes: int = 0
    gpus: int = 0
    gpu_model: str = ""
    limit: int = 50
    runtime: str = ""  # only providers offering this runtime (node.runtimes); empty: any
    runtime_sha256: bytes = b""  # ... with exactly this lock hash


class ApiBackend(Protocol):
    def extra_routes(self) -> list[Route]: ...
    def api_id(self) -> dict[str, Any]: ...
    def api_peers(self) -> dict[str, Any]: ...
    def api_status(self) -> dict[str, Any]: ...
    async def api_find(self, query: FindQuery) -> dict[str, Any]: ...


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def write_api_file(path: Path, *, url: str, token: str, peer_id: str) -> None:
    """Write api.json with mode 0600 (the token is a password for this node)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        json.dump({"url": url, "token": token, "peer_id": peer_id, "pid": os.getpid()}, f)
    os.replace(tmp, path)


def _int_param(request: Request, name: str, default: int, *, maximum: int) -> int:
    text = request.query_params.get(name)
    if text is None or text == "":
        return default
    # isdigit() alone accepts digits int() refuses ("²"), and int() refuses strings over 4300 digits
    if not (text.isascii() and text.isdigit()) or len(text) > MAX_INT_PARAM_CHARS or int(text) > maximum:
        raise BadQuery(f"{name} must be a whole number between 0 and {maximum}")
    return int(text)


def parse_find_query(request: Request) -> FindQuery:
    model = request.query_params.get("gpu_model", "")
    if len(model) > 128:
        raise BadQuery("gpu_model is too long")
    runtime = request.query_params.get("runtime", "")
    if runtime and not runtime_name_ok(runtime):
        raise BadQuery("runtime must be 1-32 of a-z, 0-9, '.', '_', '-'")
    return FindQuery(
        cpus=_int_param(request, "cpus", 1, maximum=4096),
        memory_bytes=_int_param(request, "memory", 0, maximum=1 << 50),
        gpus=_int_param(request, "gpus", 0, maximum=64),
        gpu_model=model,
        limit=_int_param(request, "limit", 50, maximum=500),
        runtime=runtime,
    )


async def read_body(request: Request, limit: int) -> bytes | None:
    """The request's body, or None if it is over ``limit`` bytes. Memory stays bounded: past the limit the rest is
    read and dropped (so that the client, still sending, gets the answer instead of a reset connection)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
    return b"".join(chunks) if size <= limit else None


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (no such route: 404, wrong method: 405) as JSON, like every other error."""
    assert isinstance(exc, HTTPException)
    code = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "bad-request")
    return JSONResponse({"error": code, "message": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    """A bug in a route: logged here (the server's own error log is off), answered as JSON without detail."""
    log.error("internal error serving %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"error": "internal", "message": "internal error (see the node's log)"}, status_code=500)


def is_public(method: str, path: str) -> bool:
    """What is served without the token: the dashboard's own files (they hold no data) and the trade of a one-time
    dashboard code for the token (see node.api_dashboard)."""
    if method == "GET" and (path == "/dashboard" or path.startswith("/dashboard/")):
        return True
    return method == "POST" and path == "/v1/dashboard/session"


class _TokenAuth(BaseHTTPMiddleware):
    def __init__(self, app: Any, token: str) -> None:
        super().__init__(app)
        self._expected = f"Bearer {token}".encode()

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        if is_public(request.method, request.url.path):
            return await call_next(request)
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, self._expected):
            return JSONResponse(
                {"error": "unauthorized", "message": "missing or wrong bearer token (see api.json in the data dir)"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        return await call_next(request)


def build_app(backend: ApiBackend, token: str) -> Starlette:
    def sync_route(fn: Callable[[], dict[str, Any]]) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            return JSONResponse(fn())

        return endpoint

    async def find(request: Request) -> Response:
        try:
            query = parse_find_query(request)
        except BadQuery as exc:
            return JSONResponse({"error": "bad-query", "message": str(exc)}, status_code=400)
        return JSONResponse(await backend.api_find(query))

    routes = [
        Route(f"/{API_VERSION}/id", sync_route(backend.api_id)),
        Route(f"/{API_VERSION}/peers", sync_route(backend.api_peers)),
        Route(f"/{API_VERSION}/status", sync_route(backend.api_status)),
        Route(f"/{API_VERSION}/find", find),
        *backend.extra_routes(),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(_TokenAuth, token=token)],
        exception_handlers={HTTPException: _http_error, Exception: _internal_error},
    )
    # An API answers the path it was given: "/v1/jobs/" is a 404, not a redirect a script would silently follow.
    app.router.redirect_slashes = False
    return app


async def serve_api(
    backend: ApiBackend,
    *,
    host: str,
    port: int,
    token: str,
    shutdown: trio.Event,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the API until ``shutdown`` is set; ``task_status.started`` gets the base URL."""
    config = HypercornConfig()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 1.0
    config.keep_alive_timeout = KEEPALIVE_S

    async def run(task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        await serve(build_app(backend, token), config, shutdown_trigger=shutdown.wait, task_status=task_status)

    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(run)
        url = binds[0] if binds else f"http://{host}:{port}"
        task_status.started(url)
