"""The web dashboard and /metrics on the local API port.

Theory of operation: the page itself (``/dashboard`` and ``/dashboard/static/*``, plain HTML/JS/CSS shipped in
the package, no CDN) is public; it holds no data. Every data call it makes carries the API's bearer token, like
any other client. The page gets the token one of two ways:

* the user pastes it (from ``api.json``);
* ``node dashboard`` asks the API (with the token) for a one-time link, ``URL/dashboard#code=CODE``. The code
  is in the URL's fragment, which browsers never send to a server, so it stays out of access logs and proxies;
  the page trades it once (``POST /v1/dashboard/session``, the only public data route) for the token, keeps that
  in ``sessionStorage`` (gone when the tab closes) and strips the fragment from the address bar. A code works
  once, for ``CODE_TTL_S``, and at most ``MAX_CODES`` are outstanding.

Everything else here is JSON the page needs beyond the general API: the network (providers, their capacity and
what is in use on them), the quote history for the price chart, and the trust graph.
"""

from __future__ import annotations

import hmac
import json
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import trio
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from node.api import FindQuery, read_body
from node.metrics import CONTENT_TYPE, NodeMetrics

if TYPE_CHECKING:
    from node.reputation.service import ReputationService
    from node.store import Store

STATIC_DIR: Final = Path(__file__).parent / "dashboard" / "static"
STATIC_FILES: Final = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
CODE_TTL_S: Final = 120.0
MAX_CODES: Final = 16
MAX_SESSION_BODY_BYTES: Final = 1024
NETWORK_CACHE_S: Final = 10.0  # provider ads live 120 s; a DHT walk per page refresh is waste
MAX_QUOTES: Final = 2000
MAX_TRUST_RECORDS: Final = 5000
# The page runs only its own files: no inline script, nothing from elsewhere, no framing.
PAGE_HEADERS: Final = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status)


class LoginCodes:
    """One-time codes for ``node dashboard`` links: each trades once for the token, within ``CODE_TTL_S``."""

    def __init__(self, token: str) -> None:
        self._token = token
        self._codes: dict[str, float] = {}  # code -> expiry (trio clock)

    def _expire(self) -> None:
        now = trio.current_time()
        self._codes = {c: t for c, t in self._codes.items() if t > now}

    def issue(self) -> str:
        self._expire()
        while len(self._codes) >= MAX_CODES:  # the oldest goes: a bound, and a leaked old link dies sooner
            del self._codes[min(self._codes, key=self._codes.__getitem__)]
        code = secrets.token_urlsafe(24)
        self._codes[code] = trio.current_time() + CODE_TTL_S
        return code

    def redeem(self, code: str) -> str | None:
        """The token for a live code (which is then spent), else None."""
        self._expire()
        for known in list(self._codes):
            if hmac.compare_digest(known.encode(), code.encode()):
                del self._codes[known]
                return self._token
        return None


def dashboard_routes(
    *,
    node: Any,
    store: Store | None,
    reputation: ReputationService | None,
    metrics: NodeMetrics,
    codes: LoginCodes,
) -> list[Route]:
    """The dashboard's routes. ``node`` is the daemon's Node (its ``find``, ``api_peers``, ``api_status``)."""
    cache: dict[str, tuple[float, list[dict[str, Any]]]] = {}
    walk = trio.Lock()  # one DHT walk at a time: an open dashboard (or several) must not swamp the node

    async def page(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=PAGE_HEADERS)

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC_FILES:  # a fixed list: no path from the request reaches the file system
            return _error(404, "not-found", "no such file")
        return FileResponse(STATIC_DIR / name, media_type=STATIC_FILES[name], headers=PAGE_HEADERS)

    async def link(request: Request) -> Response:
        code = codes.issue()
        base = str(request.base_url).rstrip("/")
        return JSONResponse({"url": f"{base}/dashboard#code={code}", "expires_in_s": CODE_TTL_S})

    async def session(request: Request) -> Response:
        raw = await read_body(request, MAX_SESSION_BODY_BYTES)
        try:
            code = json.loads(raw or b"")["code"]
            if not isinstance(code, str) or not 0 < len(code) <= 64:
                raise ValueError("code must be a short string")
        except (ValueError, KeyError, TypeError, RecursionError):
            return _error(400, "bad-request", 'expected {"code": "..."} from a `node dashboard` link')
        token = codes.redeem(code)
        if token is None:
            return _error(401, "unauthorized", "that link was used already or has expired: run `node dashboard` again")
        return JSONResponse({"token": token}, headers={"Cache-Control": "no-store"})

    async def providers() -> list[dict[str, Any]]:
        async with walk:
            cached = cache.get("providers")
            if cached is not None and trio.current_time() - cached[0] < NETWORK_CACHE_S:
                return cached[1]
            found: list[dict[str, Any]] = await node.find(FindQuery(cpus=0, limit=500))
            cache["providers"] = (trio.current_time(), found)
            return found

    async def network(request: Request) -> Response:
        found = await providers()
        in_use: dict[str, dict[str, int]] = {}
        if store is not None:
            running = store.list_jobs(states=["running"], limit=1000)
            for row in running:
                where = row.provider or ""
                if row.role == "provider":
                    where = node.identity.peer_id
                use = in_use.setdefault(where, {"jobs": 0, "cpus": 0, "memory_bytes": 0, "gpus": 0})
                use["jobs"] += 1
                for key in ("cpus", "memory_bytes", "gpus"):
                    value = row.request.get(key, 0)
                    use[key] += value if isinstance(value, int) else 0
        empty = {"jobs": 0, "cpus": 0, "memory_bytes": 0, "gpus": 0}
        return JSONResponse({
            "me": node.identity.peer_id,
            "providers": [p | {"in_use": in_use.get(p["peer_id"], empty)} for p in found],
            "peers": node.api_peers()["peers"],
            "status": node.api_status(),
        })  # fmt: skip

    async def quotes(request: Request) -> Response:
        if store is None:
            return JSONResponse({"quotes": []})
        rows = store.recent_quotes(limit=MAX_QUOTES)
        return JSONResponse({"quotes": [
            {"t": q.received_ms, "class": q.resource_class, "cost": q.cost, "provider": q.provider,
             "outcome": q.outcome, "load_permille": q.load_permille} for q in reversed(rows)
        ]})  # fmt: skip

    async def trust(request: Request) -> Response:
        if reputation is None:
            return JSONResponse({"me": node.identity.peer_id, "nodes": [], "edges": []})
        scores = {s.peer: s for s in reputation.table().ranked()}
        edges: dict[tuple[str, str], dict[str, Any]] = {}
        for r in reputation.records.rows(limit=MAX_TRUST_RECORDS):
            edge = edges.setdefault((r.rater, r.ratee), {"rater": r.rater, "ratee": r.ratee, "records": 0,
                                                          "score_sum": 0, "bad": 0, "last_ms": 0})  # fmt: skip
            edge["records"] += 1
            edge["score_sum"] += r.score
            edge["bad"] += r.outcome != "success"
            edge["last_ms"] = max(edge["last_ms"], r.time)
        names = {node.identity.peer_id, *scores} | {p for e in edges for p in e}
        nodes = [
            {"peer_id": p, "me": p == node.identity.peer_id,
             "score": round(scores[p].score, 4) if p in scores else None,
             "direct": scores[p].direct if p in scores else None,
             "explanation": scores[p].explanation if p in scores else ""}
            for p in sorted(names)
        ]  # fmt: skip
        out = [e | {"mean_score": round(e.pop("score_sum") / e["records"], 1)} for e in edges.values()]
        return JSONResponse({"me": node.identity.peer_id, "nodes": nodes, "edges": out})

    async def prometheus(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return [
        Route("/dashboard", page, methods=["GET"]),
        Route("/dashboard/static/{name}", static, methods=["GET"]),
        Route("/v1/dashboard/link", link, methods=["POST"]),
        Route("/v1/dashboard/session", session, methods=["POST"]),
        Route("/v1/dashboard/network", network, methods=["GET"]),
        Route("/v1/dashboard/quotes", quotes, methods=["GET"]),
        Route("/v1/dashboard/trust", trust, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
    ]
