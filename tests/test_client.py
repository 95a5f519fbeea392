"""The API clients and `node submit` against a fake local API (httpx.MockTransport): no daemon, no network."""

import base64
import io
import json
import re

import httpx
import pytest
import trio

from node import job_commands
from node.cli import build_parser
from node.client import ApiError, AsyncClient, Client, JobFailed, parse_size
from node.job_commands import Progress, exit_code_of

URL = "http://127.0.0.1:7410"
PEER = "12D3KooWProviderPeerIdForTests"


def finished(job_id, *, state="completed", exit_status=0, termination="exited", error=None, outputs=()):
    result = None
    if state == "completed":
        result = {
            "outputs": {name: {"sha256": "00" * 32, "size": 3} for name in outputs},
            "missing_outputs": [],
            "usage": {"cpu_ms": 10, "wall_ms": 1500, "peak_memory_bytes": 1 << 20, "gpu_ms": 0},
            "provider": PEER,
            "receipt_hash": "ab" * 32,
            "stdout_sha256": "00" * 32,
        }
    return {
        "state": state,
        "exit_status": exit_status if state == "completed" else None,
        "termination": termination if state == "completed" else None,
        "error": error,
        "cost": 120 if state == "completed" else None,
        "provider": PEER,
        "result": result,
        "receipt": {"job_id": job_id, "cost": 120, "wire_b64": "AA=="} if state == "completed" else None,
        "attempts": [{"attempt": 1, "provider": PEER, "outcome": "completed", "reason": None}],
    }


class FakeApi:
    """The job routes of the local API, scripted: each job walks through ``script`` one step per /wait."""

    def __init__(self, *, script=None, stdout=b"out\n", stderr=b"err\n", outputs=None):
        self.script = script or (lambda job_id, n: [{"state": "running"}, finished(job_id)])
        self.stdout, self.stderr, self.outputs = stdout, stderr, outputs or {}
        self.bodies = []
        self.requests = []  # (method, path, params)
        self.jobs = {}
        self.steps = {}

    def job(self, job_id):
        return self.jobs[job_id]

    def handle(self, request: httpx.Request) -> httpx.Response:
        path, params = request.url.path, dict(request.url.params)
        self.requests.append((request.method, path, params))
        if request.headers.get("authorization") != "Bearer tok":
            return httpx.Response(401, json={"error": "unauthorized", "message": "bad token"})
        if request.method == "POST" and path == "/v1/jobs":
            body = json.loads(request.content)
            if body["command"] == ["refuse"]:
                return httpx.Response(400, json={"error": "bad-submission", "message": "refused"})
            self.bodies.append(body)
            job_id = body.get("job_id") or f"j{len(self.bodies)}"
            steps = self.script(job_id, len(self.bodies) - 1)
            base = {"job_id": job_id, "role": "client", "created_ms": 1, "updated_ms": 1, "command": body["command"]}
            self.jobs[job_id] = base | {"state": "queued", "attempts": [], "result": None, "receipt": None}
            self.steps[job_id] = [base | step for step in steps]
            return httpx.Response(201, json={"job_id": job_id})
        match = re.fullmatch(r"/v1/jobs/([^/]+)(?:/(wait|cancel|logs|outputs)(?:/(.+))?)?", path)
        if match is None or match[1] not in self.jobs:
            return httpx.Response(404, json={"error": "not-found", "message": "no such job"})
        job_id, action, name = match.groups()
        if action == "wait":
            if self.steps[job_id]:
                self.jobs[job_id] = self.steps[job_id].pop(0)
            return httpx.Response(200, json=self.jobs[job_id])
        if action == "cancel":
            self.jobs[job_id] = self.jobs[job_id] | {"state": "cancelled", "error": "cancelled by the user"}
            self.steps[job_id] = []
            return httpx.Response(200, json={"job_id": job_id, "cancelled": True})
        if action == "logs":
            data = self.stdout if params.get("stream", "stdout") == "stdout" else self.stderr
            return httpx.Response(200, content=data(job_id) if callable(data) else data)
        if action == "outputs":
            if name not in self.outputs:
                return httpx.Response(404, json={"error": "not-found", "message": "no such output"})
            return httpx.Response(200, content=self.outputs[name])
        return httpx.Response(200, json=self.jobs[job_id])

    def client(self):
        return Client(URL, "tok", transport=httpx.MockTransport(self.handle))

    def async_client(self):
        return AsyncClient(URL, "tok", transport=httpx.MockTransport(self.handle))


# ----------------------------------------------------------------------------------------------- client


@pytest.mark.parametrize(
    ("text", "size"),
    [("512MiB", 512 << 20), ("2G", 2 << 30), ("1.5 GB", 1_500_000_000), ("1000", 1000), ("4kib", 4096)],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "5 parsecs", "-1MiB"])
def test_parse_size_rejects_nonsense(text):
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def test_submit_builds_the_body(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.csv").write_text("a,b\n")
    api = FakeApi()
    with api.client() as client:
        job = client.submit(
            ["python3", "job.py"],
            cpus=2,
            memory="2GiB",
            disk=10**9,
            max_price=5000,
            inputs={"data.csv": "data.csv", "job.py": b"print(1)\n", "abs.csv": tmp_path / "data.csv"},
            outputs=["out.png"],
            env={"SEED": "1"},
            job_id="my-job",
        )
    assert job.job_id == "my-job"
    (body,) = api.bodies
    assert body["command"] == ["python3", "job.py"]
    assert body["cpus"] == 2
    assert body["memory_bytes"] == 2 << 30
    assert body["disk_bytes"] == 10**9
    assert body["max_price"] == 5000
    assert body["inputs"] == [
        {"name": "data.csv", "path": str(tmp_path / "data.csv")},  # a relative path, sent absolute
        {"name": "job.py", "data_b64": base64.b64encode(b"print(1)\n").decode()},
        {"name": "abs.csv", "path": str(tmp_path / "data.csv")},
    ]
    assert body["outputs"] == ["out.png"]
    assert body["env"] == {"SEED": "1"}
    assert body["job_id"] == "my-job"


def test_submit_leaves_defaults_to_the_node_and_rejects_a_shell_string():
    api = FakeApi()
    with api.client() as client:
        client.submit(["true"])
        with pytest.raises(TypeError, match="list of strings"):
            client.submit("echo hi")
        with pytest.raises(ValueError, match="not a size"):
            client.submit(["true"], memory="plenty")
    (body,) = api.bodies
    assert body["memory_bytes"] == 512 << 20
    assert "max_price" not in body
    assert "job_id" not in body


def test_result_of_a_job_that_exited_non_zero_is_not_a_failure():
    def script(job_id, n):
        return [{"state": "negotiating"}, {"state": "running"}, finished(job_id, exit_status=3, outputs=["o.txt"])]

    api = FakeApi(script=script, outputs={"o.txt": b"abc"})
    with api.client() as client:
        result = client.submit(["false"], outputs=["o.txt"]).result()
    assert result.state == "completed"
    assert result.exit_code == 3
    assert not result.ok
    assert result.stdout == b"out\n"
    assert result.stderr == b"err\n"
    assert result.outputs == {"o.txt": b"abc"}
    assert result.provider == PEER
    assert result.cost == 120
    assert result.receipt["wire_b64"] == "AA=="
    assert result.error is None
    assert result.attempts == 1


def test_result_of_a_failed_job_raises_job_failed_with_its_error():
    reasons = "no provider took the job: 2 refused (busy), 1 over your max price 100"

    def script(job_id, n):
        return [finished(job_id, state="failed", error=reasons)]

    api = FakeApi(script=script)
    with api.client() as client:
        job = client.submit(["true"])
        with pytest.raises(JobFailed) as info:
            job.result()
        unchecked = job.result(check=False)
    assert isinstance(info.value, ApiError)
    assert info.value.error == reasons
    assert info.value.state == "failed"
    assert reasons in str(info.value)
    assert unchecked.state == "failed"
    assert unchecked.error == reasons
    assert unchecked.outputs == {}


def test_a_cancelled_job_raises_job_failed():
    api = FakeApi(script=lambda job_id, n: [{"state": "running"}] * 100)
    with api.client() as client:
        job = client.submit(["sleep", "100"])
        assert job.cancel() is True
        with pytest.raises(JobFailed, match="cancelled by the user"):
            job.result()


def test_wait_raises_timeout_error_when_the_job_is_still_running():
    api = FakeApi(script=lambda job_id, n: [{"state": "running"}] * 100)
    with api.client() as client:
        job = client.submit(["sleep", "100"])
        with pytest.raises(TimeoutError, match="still running"):
            job.wait(timeout=0)
    waits = [params for method, path, params in api.requests if path.endswith("/wait")]
    assert waits == [{"timeout": "0.000"}]  # one long-poll, no longer than the caller's timeout


def test_unknown_job_and_bad_token_are_api_errors():
    api = FakeApi()
    with api.client() as client:
        with pytest.raises(ApiError, match="404 from /v1/jobs/nope: no such job") as info:
            client.job("nope").status()
        assert info.value.status == 404
        assert info.value.code == "not-found"
    with (
        Client(URL, "wrong", transport=httpx.MockTransport(api.handle)) as client,
        pytest.raises(ApiError, match="401"),
    ):
        client.jobs()


def test_map_submits_everything_first_and_keeps_input_order():
    # Later jobs finish sooner (fewer running steps), so completion order is the reverse of input order.
    def script(job_id, n):
        return [{"state": "running"}] * (5 - n) + [finished(job_id, exit_status=n)]

    api = FakeApi(script=script, stdout=lambda job_id: job_id.encode())
    with api.client() as client:
        results = client.map([["python3", "-c", f"print({i})"] for i in range(5)])
        again = client.map([["true"], ["false"]], cpus=2)
    assert [r.exit_code for r in results] == [0, 1, 2, 3, 4]
    assert [r.stdout for r in results] == [b"j1", b"j2", b"j3", b"j4", b"j5"]
    assert [b["command"][2] for b in api.bodies[:5]] == [f"print({i})" for i in range(5)]
    first_wait = next(i for i, (_, path, _) in enumerate(api.requests) if path.endswith("/wait"))
    posts = [i for i, (method, path, _) in enumerate(api.requests) if method == "POST" and path == "/v1/jobs"]
    assert posts[:5] == list(range(5))
    assert first_wait > posts[4]
    assert [r.job_id for r in again] == ["j6", "j7"]
    assert api.bodies[-1]["cpus"] == 2


def test_map_checks_every_command_before_submitting_any():
    api = FakeApi()
    with api.client() as client, pytest.raises(TypeError, match="list of strings"):
        client.map([["true"], ["true"], "not a list"])
    assert api.bodies == []


def test_map_cancels_what_it_submitted_when_the_node_refuses_a_job():
    api = FakeApi(script=lambda job_id, n: [{"state": "running"}] * 100)
    with api.client() as client, pytest.raises(ApiError, match=r"400 .* refused"):
        client.map([["true"], ["true"], ["refuse"]])
    assert [api.job(job_id)["state"] for job_id in ("j1", "j2")] == ["cancelled", "cancelled"]


async def test_async_client_submit_and_result():
    api = FakeApi(outputs={"o.txt": b"xyz"}, script=lambda job_id, n: [finished(job_id, outputs=["o.txt"])])
    with trio.fail_after(10):
        async with api.async_client() as client:
            job = await client.submit(["echo", "hi"], memory=64 << 20, inputs={"in": b"data"}, outputs=["o.txt"])
            result = await job.result()
            assert (await job.status())["state"] == "completed"
            chunks = [chunk async for chunk in job.logs("stderr")]
            results = await client.map([["a"], ["b"]])
    assert api.bodies[0]["memory_bytes"] == 64 << 20
    assert result.ok
    assert result.stdout == b"out\n"
    assert result.outputs == {"o.txt": b"xyz"}
    assert b"".join(chunks) == b"err\n"
    assert [r.job_id for r in results] == ["j2", "j3"]


async def test_async_wait_timeout_and_failure():
    api = FakeApi(
        script=lambda job_id, n: (
            [{"state": "running"}] * 100 if n == 0 else [finished(job_id, state="failed", error="nobody home")]
        )
    )
    with trio.fail_after(10):
        async with api.async_client() as client:
            slow = await client.submit(["sleep", "9"])
            with pytest.raises(TimeoutError):
                await slow.wait(timeout=0)
            failing = await client.submit(["true"])
            with pytest.raises(JobFailed, match="nobody home"):
                await failing.result()


# ----------------------------------------------------------------------------------------------- node submit


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"state": "completed", "exit_status": 0, "termination": "exited"}, 0),
        ({"state": "completed", "exit_status": 3, "termination": "exited"}, 3),
        ({"state": "completed", "exit_status": 137, "termination": "memory-limit"}, 137),
        ({"state": "completed", "exit_status": 0, "termination": "wall-timeout"}, 1),
        ({"state": "completed", "exit_status": None, "termination": "sandbox-error"}, 1),
        ({"state": "completed", "exit_status": -9, "termination": "exited"}, 137),
        ({"state": "failed"}, 1),
        ({"state": "cancelled"}, 1),
    ],
)
def test_exit_code_of(fields, code):
    assert exit_code_of(fields) == code


def run_submit_cli(api, argv):
    args = build_parser().parse_args(["submit", *argv])
    return job_commands.cmd_submit(args, connect=lambda _args: api.async_client())


def test_submit_cli_prints_output_saves_files_and_exits_with_the_job_code(tmp_path, capsysbinary):
    (tmp_path / "in.csv").write_bytes(b"1,2\n")

    def script(job_id, n):
        return [{"state": "negotiating"}, {"state": "running"}, finished(job_id, exit_status=4, outputs=["r.txt"])]

    api = FakeApi(script=script, stdout=b"hello\n", stderr=b"warning\n", outputs={"r.txt": b"res"})
    argv = ["--input", f"{tmp_path / 'in.csv'}:data.csv", "--output", "r.txt", "--out-dir", str(tmp_path / "out")]
    argv += ["--memory", "1GiB", "--env", "A=b=c", "--", "python3", "-c", "import sys; sys.exit(4)"]
    assert run_submit_cli(api, argv) == 4
    captured = capsysbinary.readouterr()
    assert captured.out == b"hello\n"  # once: followed live, not printed again at the end
    assert captured.err.startswith(b"warning\n")
    assert f"completed on {PEER[:16]}".encode() in captured.err
    assert b"cost 120 milli-credits" in captured.err
    assert b"saved r.txt" in captured.err
    assert (tmp_path / "out" / "r.txt").read_bytes() == b"res"
    (body,) = api.bodies
    assert body["command"] == ["python3", "-c", "import sys; sys.exit(4)"]
    assert body["inputs"] == [{"name": "data.csv", "path": str(tmp_path / "in.csv")}]
    assert body["memory_bytes"] == 1 << 30
    assert body["env"] == {"A": "b=c"}


def test_submit_cli_failed_job_exits_1_with_the_reasons(capsys):
    reasons = "no provider took the job: 3 over your max price (cheapest asked 250)"
    api = FakeApi(script=lambda job_id, n: [{"state": "negotiating"}, finished(job_id, state="failed", error=reasons)])
    assert run_submit_cli(api, ["--max-price", "100", "--", "true"]) == 1
    captured = capsys.readouterr()
    assert f"node submit: job j1 failed: {reasons}" in captured.err
    assert "Traceback" not in captured.err
    assert api.bodies[0]["max_price"] == 100


def test_submit_cli_json_and_no_wait(capsys):
    api = FakeApi(script=lambda job_id, n: [finished(job_id, exit_status=2)])
    assert run_submit_cli(api, ["--json", "--", "true"]) == 2
    assert json.loads(capsys.readouterr().out)["exit_status"] == 2
    assert run_submit_cli(api, ["--no-wait", "--", "true"]) == 0
    assert capsys.readouterr().out == "j2\n"


def test_submit_cli_api_errors_are_messages_not_tracebacks(tmp_path, capsys):
    api = FakeApi()
    assert run_submit_cli(api, ["--input", str(tmp_path / "missing.csv"), "--", "true"]) == 2
    assert "is not a file" in capsys.readouterr().err
    assert run_submit_cli(api, ["--env", "NOEQUALS", "--", "true"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
    assert api.bodies == []
    args = build_parser().parse_args(["submit", "--data-dir", str(tmp_path), "--", "true"])
    assert job_commands.cmd_submit(args) == 1
    assert "no running node found" in capsys.readouterr().err


def test_submit_cli_prints_the_final_attempts_output_after_a_retry(capsysbinary):
    """The live output of an attempt that failed is followed by the whole output of the one that completed."""
    followed = trio.Event()
    steps = [
        {"state": "running", "attempts": [{"attempt": 1, "provider": PEER, "outcome": None, "reason": None}]},
        {
            "state": "negotiating",
            "attempts": [{"attempt": 1, "provider": PEER, "outcome": "failed", "reason": "the provider went away"}],
        },
        finished("j1"),
    ]
    api = FakeApi(script=lambda job_id, n: steps)

    async def first_attempt_stdout():
        yield b"partial\n"
        followed.set()  # the follower asked for more: it has written what it got
        await trio.sleep_forever()  # the attempt hangs; the retry must stop this follower

    async def handle(request):
        path, params = request.url.path, dict(request.url.params)
        if path.endswith("/logs") and params.get("follow") == "1":
            if params["stream"] == "stdout":
                return httpx.Response(200, content=first_attempt_stdout())
            return httpx.Response(200, content=b"")
        if path.endswith("/logs"):
            return httpx.Response(200, content=b"final\n" if params["stream"] == "stdout" else b"")
        if path.endswith("/wait") and len(api.steps.get("j1", ())) == 2:  # about to report the failed attempt
            with trio.fail_after(5):
                await followed.wait()
        return api.handle(request)

    args = build_parser().parse_args(["submit", "--", "true"])
    code = job_commands.cmd_submit(
        args, connect=lambda _a: AsyncClient(URL, "tok", transport=httpx.MockTransport(handle))
    )
    assert code == 0
    captured = capsysbinary.readouterr()
    assert captured.out == b"partial\nfinal\n"
    assert b"attempt 1 on" in captured.err
    assert b"failed: the provider went away" in captured.err


def test_progress_draws_a_spinner_only_on_a_terminal():
    tty, pipe = io.StringIO(), io.StringIO()
    for stream, is_tty in ((tty, True), (pipe, False)):
        progress = Progress(stream, tty=is_tty)
        progress.state("negotiating…")
        progress.tick()
        progress.note("done")
    assert "negotiating…" in tty.getvalue()
    assert "\r\x1b[K" in tty.getvalue()
    assert pipe.getvalue() == "coop: done\n"


def test_the_client_drops_idle_connections_before_the_server_does():
    """Otherwise a client reusing a connection the server has just closed fails with "server disconnected"."""
    from node.api import KEEPALIVE_S
    from node.client import KEEPALIVE_EXPIRY_S

    assert KEEPALIVE_EXPIRY_S < KEEPALIVE_S
