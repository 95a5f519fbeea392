"""Fuzzing the local HTTP API of a real node process, and the submission parser behind ``POST /v1/jobs``.

Invariants: a request without the right bearer token is always answered 401; with it, every answer is a 2xx or
a 4xx with a JSON error body (never a 500), whatever the path, method, headers, query or body; garbage bytes on
the socket never take the node down; and afterwards the node still serves ``/v1/status`` and runs a real job.
"""

from __future__ import annotations

import contextlib
import json
import os
import string
from functools import partial
from urllib.parse import quote

import httpx
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.market.requests import BadSubmission, parse_submission
from protocol import codec
from protocol.messages import FileRef, JobSpec, QuoteRequest
from tests.factories import ALICE

# --------------------------------------------------------------------------------------------- the parser

FIELDS = [
    "command",
    "env",
    "cpus",
    "memory_bytes",
    "disk_bytes",
    "gpus",
    "gpu_model",
    "timeout",
    "cpu_seconds",
    "output_bytes",
    "max_price",
    "inputs",
    "outputs",
    "job_id",
]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
WRONG = [
    None,
    True,
    False,
    -1,
    0,
    1 << 70,
    1.5,
    "",
    "x",
    "\x00",
    "a" * 5000,
    [],
    [1],
    ["a", 1],
    {},
    {"a": 1},
    ["x"] * 300,
    {"name": "a" * 255, "data_b64": ""},
    [{"name": "a" * 251, "data_b64": ""}],
    ["a" * 251],
    "\ud800",
    ["\udfff"],
    {"\ud800": "x"},
]
VALID = {"command": ["true"], "timeout": 5, "memory_bytes": 64 << 20, "max_price": 0}


def with_field(field: str, value: object) -> dict[str, object]:
    return VALID | {field: value}


submissions = st.one_of(
    json_values,
    st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6),
    st.builds(with_field, st.sampled_from(FIELDS), st.one_of(st.sampled_from(WRONG), json_values)),
)


def parses_or_refuses(body: object) -> None:
    """Any JSON is a submission or a BadSubmission; and what the parser accepts, a signed JobSpec can carry
    (before the fix, a 300-argument command was accepted and failed later, inside the job)."""
    with contextlib.suppress(BadSubmission):
        request = parse_submission(body)
        spec = JobSpec(
            job_id="j-1",
            client=ALICE.peer_id,
            agreement_hash=bytes(32),
            command=request.command,
            env=request.env,
            outputs=request.outputs,
            limits=request.limits,
            inputs=tuple(FileRef(name=i.name, sha256=bytes(32), size=0) for i in request.inputs),
        )
        # and both messages it becomes can be sent (lone surrogates, from JSON escapes, cannot be)
        codec.encode(spec)
        codec.encode(
            QuoteRequest(
                job_id="j-1",
                client=ALICE.peer_id,
                resources=request.resources,
                limits=request.limits,
                max_price=request.max_price,
                deadline=1,
            )
        )


@given(body=submissions)
def test_any_json_is_a_submission_or_a_bad_submission(body):
    parses_or_refuses(body)


def test_every_field_with_every_wrong_value():
    for field in FIELDS:
        for value in WRONG:
            parses_or_refuses(with_field(field, value))


# --------------------------------------------------------------------------------------------- the node

ROUTES = [
    "/v1/id",
    "/v1/peers",
    "/v1/status",
    "/v1/find",
    "/v1/jobs",
    "/v1/jobs/{id}",
    "/v1/jobs/{id}/wait",
    "/v1/jobs/{id}/cancel",
    "/v1/jobs/{id}/logs",
    "/v1/jobs/{id}/outputs/{name}",
    "/v1/jobs/{id}/rate",
    "/v1/market",
    "/v1/ledger",
    "/v1/reputation",
    "/v1/reputation/{peer}",
]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "FOO"]
PARAMS = ["limit", "timeout", "cpus", "memory", "gpus", "gpu_model", "top", "stream", "follow", "x"]
ODD_VALUES = ["-1", "nan", "inf", "-inf", "1e999", "0", "300", "1", "²", "١٢", "9" * 5000, "", " 1", "0x10", "stderr"]
segments = st.one_of(
    st.text(st.characters(exclude_characters="/?#%", exclude_categories=("Cs",)), min_size=1, max_size=24),
    st.sampled_from(["..", ".", "%2e%2e", "%00", "%ff", "%2F", "x" * 3000, "jobs", "v1"]),
)
header_names = st.text(string.ascii_letters + "-", min_size=1, max_size=20).filter(
    lambda n: n.lower() not in ("authorization", "content-length", "transfer-encoding", "host", "connection")
)
header_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=100).map(
    str.strip
)  # h11: no edge blanks


def deep(n: int) -> bytes:
    return b"[" * n + b"]" * n


bodies = st.one_of(
    st.none(),
    st.binary(max_size=512),
    json_values.map(lambda v: json.dumps(v).encode()),
    # without job_id: a job the fuzzer creates must never be one that a path names (a wait on it could block)
    submissions.map(
        lambda v: json.dumps({k: v for k, v in v.items() if k != "job_id"} if isinstance(v, dict) else v).encode()
    ),
    st.sampled_from([deep(100_000), b'{"score": ' + deep(50_000) + b"}", b"NaN", b'{"score": 5, "comment": 1}']),
)


@st.composite
def requests(draw: st.DrawFn, job_id: str, peer_id: str) -> tuple[str, str, dict[str, str], dict[str, str], bytes]:
    route = draw(st.sampled_from(ROUTES))
    # percent-encoded, except for the escapes in the segments themselves (%00, %2F...): httpx refuses raw controls
    ids = st.one_of(st.just(job_id), segments).map(lambda v: quote(v, safe="%"))
    peers = st.one_of(st.just(peer_id), segments).map(lambda v: quote(v, safe="%"))
    path = route.format(id=draw(ids), name=quote(draw(segments), safe="%"), peer=draw(peers))
    if draw(st.booleans()):
        path = "/" + "/".join(quote(s, safe="%") for s in draw(st.lists(segments, max_size=5)))
    params = draw(
        st.dictionaries(
            st.sampled_from(PARAMS), st.one_of(st.sampled_from(ODD_VALUES), st.text(max_size=8)), max_size=3
        )
    )
    headers = draw(st.dictionaries(header_names, header_values, max_size=3))
    method = draw(st.sampled_from(METHODS))
    return method, path, params, headers, draw(bodies) or b""


def check_authorized(method: str, path: str, response: httpx.Response) -> None:
    status = response.status_code
    # No redirects either: "/v1/jobs/" or "/v1/reputation/%2F" is a 404, not a 307 to somewhere else.
    assert 200 <= status < 300 or 400 <= status < 500, (status, method, path, response.text[:500])
    if status >= 400 and method != "HEAD":
        assert response.headers["content-type"] == "application/json", (status, method, path, response.text[:200])
        assert isinstance(response.json()["error"], str)


def fuzz_the_api(url: str, token: str, job_id: str, peer_id: str) -> None:
    """Run in a worker thread (hypothesis and a blocking client), while the node runs in its own process."""
    # A connection per request: the server closes one whose request body it did not read (401, 413), and httpx
    # would race that close on a kept-alive connection ("server disconnected"), which is no fault of the node.
    no_reuse = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(base_url=url, trust_env=False, timeout=30, limits=no_reuse) as http:

        @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(
            request=requests(job_id, peer_id),
            auth=st.sampled_from(["", "Bearer wrong", f"bearer {token}", f"Bearer {token}x", "Bearer  " + token]),
        )
        def example(request: tuple[str, str, dict[str, str], dict[str, str], bytes], auth: str) -> None:
            method, path, params, headers, body = request
            unauthorized = http.request(
                method, path, params=params, headers=headers | {"Authorization": auth}, content=body
            )
            assert unauthorized.status_code == 401, (method, path, unauthorized.status_code)
            if method != "HEAD":
                assert unauthorized.json()["error"] == "unauthorized"
            answer = http.request(
                method, path, params=params, headers=headers | {"Authorization": f"Bearer {token}"}, content=body
            )
            check_authorized(method, path, answer)

        example()
        good = {"Authorization": f"Bearer {token}"}
        huge = http.post("/v1/jobs", headers=good, content=b"a" * ((96 << 20) + 1))
        assert huge.status_code == 413, huge.text[:200]
        assert http.post(f"/v1/jobs/{job_id}/rate", headers=good, content=b"{" * (1 << 20)).status_code == 413
        unreadable = {"command": ["true"], "inputs": [{"name": "mem", "path": "/proc/self/mem"}]}
        check_authorized("POST", "/v1/jobs", http.post("/v1/jobs", headers=good, json=unreadable))
        for limit in ("abc", "-5", "²"):
            check_authorized("GET", "/v1/jobs", http.get("/v1/jobs", headers=good, params={"limit": limit}))
        for timeout in ("nan", "-1", "abc"):
            answer = http.get(f"/v1/jobs/{job_id}/wait", headers=good, params={"timeout": timeout})
            assert answer.status_code == 400, answer.text


GARBAGE = [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64),  # a TLS hello
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + os.urandom(32),
    b"GET /v1/status HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET /v1/status HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
    b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\r\n" * 1000,
    os.urandom(4096),
]


async def throw_raw_bytes(host: str, port: int) -> None:
    for data in GARBAGE:
        stream = await trio.open_tcp_stream(host, port)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            async with stream:
                await stream.send_all(data)
                await stream.send_eof()  # so that a server waiting for the rest of a request gives up at once
                with trio.move_on_after(5):
                    answer = b""
                    while chunk := await stream.receive_some():
                        answer += chunk
                    # the HTTP server's own refusal (not JSON: it never reached the app), or HTTP/2 frames
                    assert not answer.startswith(b"HTTP/1.1 5"), answer[:100]


@pytest.mark.slow
async def test_the_local_api_answers_garbage_with_4xx_json_and_keeps_serving(launcher):
    with trio.fail_after(120):
        node = launcher.make("fuzzed")
        await launcher.start(node)
        info = node.api_info()
        job = await node.wait_job(await node.submit(["python3", "-c", "print(6*7)"]))
        assert job["state"] == "completed", (job["error"], job["attempts"])

        await trio.to_thread.run_sync(partial(fuzz_the_api, info["url"], info["token"], job["job_id"], node.peer_id))
        host, port = info["url"].removeprefix("http://").rsplit(":", 1)
        await throw_raw_bytes(host, int(port))

        assert node.process is not None
        assert node.process.returncode is None
        assert [line for line in node.lines if "internal error" in line] == []
        assert (await node.api("GET", "/v1/status"))["peer_id"] == node.peer_id
        job = await node.wait_job(await node.submit(["python3", "-c", "print(6*7)"]))
        assert job["state"] == "completed", (job["error"], job["attempts"])
        assert await node.api("GET", f"/v1/jobs/{job['job_id']}/logs") == b"42\n"
