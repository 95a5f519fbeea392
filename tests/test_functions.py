"""Function jobs without a network: the call pickle, the runner (a real subprocess), results and remote errors,
caps and unpicklable values at submit time, runtimes (resolve, config, advertising, refusal), the wire fields."""

import dataclasses
import hashlib
import json
import re
import subprocess
import sys
import threading

import httpx
import pytest

from node import function_runner as runner
from node.client import Client, JobResult
from node.config import ConfigError, NodeConfig, load_config_file, write_default_config
from node.functions import (
    COMMAND,
    RUNNER_NAME,
    RUNNER_SOURCE,
    PayloadTooLarge,
    RemoteError,
    RemoteTraceback,
    SerializationError,
    decode_result,
    encode_call,
)
from node.market.requests import BadSubmission, parse_submission
from node.runtime_commands import add_runtime
from node.runtimes import LOCK_FILE, lock_hash, resolve_venv
from node.sandbox.command import bwrap_argv
from node.sandbox.detect import HostLayout
from node.sandbox.spec import ExecSpec
from protocol import codec
from protocol.errors import MalformedMessage
from protocol.market import MarketPolicy, runtime_mismatch
from protocol.messages import PriceSheet, RejectCode, Resources, Runtime
from tests.factories import quote_request


def add(a, b):
    return a + b


def fails(x):
    raise KeyError(f"no {x}")


class Unpicklable(Exception):
    def __reduce__(self):
        raise TypeError("not today")


def raises_unpicklable():
    raise Unpicklable("odd")


def run_call(tmp_path, payload: bytes, *, env=None) -> JobResult:
    """Run the runner as the sandbox would (python3 -m coop_runner in the work dir), minus the sandbox."""
    (tmp_path / RUNNER_NAME).write_bytes(RUNNER_SOURCE)
    (tmp_path / runner.CALL_FILE).write_bytes(payload)
    done = subprocess.run(
        [sys.executable, *COMMAND[1:]], cwd=tmp_path, capture_output=True, env=env, check=False, timeout=60
    )
    out = tmp_path / runner.RESULT_FILE
    outputs = {runner.RESULT_FILE: out.read_bytes()} if out.exists() else {}
    return JobResult(job_id="j1", state="completed", exit_code=done.returncode, stdout=done.stdout,
                     stderr=done.stderr, outputs=outputs, provider=None, cost=None, receipt=None, error=None,
                     attempts=1)  # fmt: skip


def test_a_call_runs_and_its_value_comes_back(tmp_path):
    result = run_call(tmp_path, encode_call(add, (2, 40), {}, max_bytes=1 << 20))
    assert result.exit_code == 0
    assert decode_result(result) == 42
    square = run_call(tmp_path, encode_call(lambda n: [n] * 3, ("x",), {}, max_bytes=1 << 20))
    assert decode_result(square) == ["x", "x", "x"]


def test_a_remote_exception_is_reraised_with_its_traceback(tmp_path):
    result = run_call(tmp_path, encode_call(fails, ("key",), {}, max_bytes=1 << 20))
    assert result.exit_code == 0  # the job ran: its outcome is the exception
    with pytest.raises(KeyError, match="no key") as caught:
        decode_result(result)
    cause = caught.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert re.search(r"line \d+, in fails\n", cause.text)  # the caller's code travels by value: no source lines
    assert cause.text.endswith("KeyError: 'no key'\n")


def test_an_exception_that_does_not_pickle_becomes_remote_error(tmp_path):
    result = run_call(tmp_path, encode_call(raises_unpicklable, (), {}, max_bytes=1 << 20))
    with pytest.raises(RemoteError, match="Unpicklable: odd") as caught:
        decode_result(result)
    assert "in raises_unpicklable" in caught.value.remote_traceback


def test_other_python_versions_are_refused_with_a_clear_error(tmp_path):
    payload = encode_call(add, (1, 2), {}, max_bytes=1 << 20)
    _, _, body = payload.partition(b"\n")
    other = json.dumps({"format": runner.FORMAT, "python": "2.7"}).encode() + b"\n" + body
    with pytest.raises(RemoteError, match=r"cannot load a call pickled by Python 2\.7"):
        decode_result(run_call(tmp_path, other))


def test_results_over_the_cap_are_refused_in_the_job(tmp_path):
    env = {"PATH": "/usr/bin:/bin", runner.RESULT_CAP_ENV: "1000"}
    result = run_call(tmp_path, encode_call(bytes, (5000,), {}, max_bytes=1 << 20), env=env)
    with pytest.raises(ValueError, match="over the cap of 1000"):
        decode_result(result)


def test_a_runner_that_never_wrote_a_result_says_why():
    result = JobResult(job_id="j9", state="completed", exit_code=137, stdout=b"", stderr=b"Killed\n", outputs={},
                       provider=None, cost=None, receipt=None, error=None, attempts=1,
                       termination="memory-limit")  # fmt: skip
    with pytest.raises(RemoteError, match="wrote no result \\(memory-limit, exit status 137\\)") as caught:
        decode_result(result)
    assert "Killed" in caught.value.remote_traceback


def no_network_client() -> Client:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"nothing may be sent: {request.url}")

    return Client("http://node.invalid", "t", transport=httpx.MockTransport(refuse))


def test_unpicklable_values_and_oversized_calls_fail_at_submit_time():
    with no_network_client() as client:
        with pytest.raises(SerializationError, match="cannot send add"):
            client.submit(add, threading.Lock(), 1)
        with pytest.raises(PayloadTooLarge, match="over the cap of 1000"):
            client.submit(add, b"x" * 2000, b"", max_payload=1000)
        with pytest.raises(SerializationError):  # checked for every item before anything is submitted
            client.map(add, [1, threading.Lock()])
        with pytest.raises(TypeError, match="inputs= and outputs= are for command jobs"):
            client.submit(add, 1, 2, inputs={"a": b""})
        with pytest.raises(TypeError, match="takes only options"):
            client.submit(["true"], 1)


def test_function_jobs_are_command_jobs_in_a_runtime():
    bodies = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json={"job_id": f"j{len(bodies)}"})

    with Client("http://node.invalid", "t", transport=httpx.MockTransport(handler)) as client:
        job = client.submit(add, 1, 2, runtime="ml", cpus=2, memory="1GiB", max_price=77)
    assert job.job_id == "j1"
    (body,) = bodies
    assert body["command"] == list(COMMAND)
    assert (body["runtime"], body["cpus"], body["memory_bytes"], body["max_price"]) == ("ml", 2, 1 << 30, 77)
    assert [i["name"] for i in body["inputs"]] == [RUNNER_NAME, runner.CALL_FILE]
    assert body["outputs"] == [runner.RESULT_FILE]
    request = parse_submission(body)
    assert request.resources.runtime == "ml"
    default = parse_submission({**body, "runtime": "python"})
    assert default.resources.runtime == "python"


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"runtime": "Bad Name"}, "runtime must be"),
        ({"runtime": 5}, "runtime must be"),
        ({"runtime": "ml", "runtime_sha256": "zz"}, "64 hex"),
        ({"runtime_sha256": "00" * 32}, "given with a runtime"),
    ],
)
def test_submissions_with_bad_runtimes_are_refused(fields, match):
    with pytest.raises(BadSubmission, match=match):
        parse_submission({"command": ["true"], **fields})


# ----------------------------------------------------------------------------------------------- wire, policy


def test_runtime_fields_are_omitted_at_their_defaults():
    plain = quote_request()
    assert b"runtime" not in codec.encode(plain)  # encodes as before the fields existed: old nodes accept it
    pinned = dataclasses.replace(
        plain, resources=Resources(runtime="ml", runtime_sha256=b"\x01" * 32, memory_bytes=1 << 20)
    )
    assert codec.decode(codec.encode(pinned)) == pinned
    body = codec.to_plain(plain)
    body["resources"]["runtime"] = ""  # an explicit default: a second encoding of the same message
    frame = codec.pack_canonical([codec.WIRE_VERSION, plain.TYPE, body])
    with pytest.raises(MalformedMessage, match="must be omitted"):
        codec.decode(frame)


def test_providers_refuse_runtimes_they_lack_or_whose_lock_differs():
    lock = hashlib.sha256(b"numpy==2.0").digest()
    offered = (Runtime(name="python", interpreter="cpython-3.11.7"), Runtime(name="ml", lock_sha256=lock))
    policy = MarketPolicy(floor=PriceSheet(), cpus=64, memory_bytes=1 << 40, disk_bytes=1 << 40, runtimes=offered)

    def asking(**res):
        return dataclasses.replace(quote_request(), resources=Resources(**res))

    assert policy.admit(asking(runtime="ml")) is None
    assert policy.admit(asking(runtime="ml", runtime_sha256=lock)) is None
    assert policy.admit(asking()) is None
    refused = policy.admit(asking(runtime="gpu-stack"))
    assert refused is not None
    assert refused.code is RejectCode.NO_RUNTIME
    assert "no runtime 'gpu-stack'" in refused.message
    other = policy.admit(asking(runtime="ml", runtime_sha256=b"\x02" * 32))
    assert other is not None
    assert "different lock hash" in other.message
    assert runtime_mismatch((), Resources(runtime="python"))


# ----------------------------------------------------------------------------------------------- runtimes


def make_venv(path, *, packages=("cloudpickle-3.1.0",)):
    """The shape of a venv (what resolve_venv reads) without running venv: fast."""
    (path / "bin").mkdir(parents=True)
    (path / "bin" / "python").symlink_to("/usr/bin/python3")
    (path / "pyvenv.cfg").write_text("home = /usr/bin\nversion = 3.11.2\n")
    site = path / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True)
    for p in packages:
        (site / f"{p}.dist-info").mkdir()
    return path


def test_a_venv_resolves_to_its_interpreter_binds_and_lock(tmp_path):
    venv = make_venv(tmp_path / "ml")
    runtime = resolve_venv("ml", venv, job_uid=0, job_gid=0)
    assert runtime.usable, runtime.error
    assert runtime.interpreter == "cpython-3.11.2"
    assert runtime.binds == (str(venv),)  # /usr is in every sandbox already
    assert runtime.env["PATH"].startswith(f"{venv}/bin:")
    assert runtime.wire() == Runtime(name="ml", interpreter="cpython-3.11.2", lock_sha256=runtime.lock_sha256)
    more = make_venv(tmp_path / "ml2", packages=("cloudpickle-3.1.0", "numpy-2.0.0"))
    assert lock_hash(more) != runtime.lock_sha256  # a different set of packages: a different hash
    (venv / LOCK_FILE).write_text("cloudpickle==3.1.0\n")
    assert lock_hash(venv) == hashlib.sha256(b"cloudpickle==3.1.0\n").digest()
    broken = resolve_venv("bad", tmp_path / "nothing")
    assert not broken.usable
    assert "is not a venv" in broken.error


def test_runtimes_are_read_from_the_config(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('[runtimes]\nml = "/opt/ml"\ntorch-2 = "/opt/torch"\n')
    loaded = load_config_file(config, NodeConfig(data_dir=tmp_path))
    assert loaded.runtimes == (("ml", "/opt/ml"), ("torch-2", "/opt/torch"))
    config.write_text('[runtimes]\n"Bad Name" = "/opt/ml"\n')
    with pytest.raises(ConfigError, match="Bad Name"):
        load_config_file(config, NodeConfig(data_dir=tmp_path))
    config.write_text('[runtimes]\nml = "relative/path"\n')
    with pytest.raises(ConfigError, match="absolute venv path"):
        load_config_file(config, NodeConfig(data_dir=tmp_path))


def test_runtime_dirs_are_bound_read_only_into_tier_a(tmp_path):
    spec = ExecSpec(command=("python3", "-m", "coop_runner"), work_dir=tmp_path / "w", ro_binds=("/opt/ml",))
    layout = HostLayout(dirs=("/usr",), symlinks=(), etc_files=())
    argv, _ = bwrap_argv(spec, bwrap="bwrap", bwrap_version=None, layout=layout, prlimit="prlimit", limits=(),
                         seccomp_fd=3, status_fd=4, args_fd=5)  # fmt: skip
    i = argv.index("/opt/ml")
    assert argv[i - 1 : i + 2] == ["--ro-bind", "/opt/ml", "/opt/ml"]
    with pytest.raises(ValueError, match="absolute"):
        ExecSpec(command=("true",), work_dir=tmp_path / "w", ro_binds=("relative",))


def test_runtime_add_edits_the_commented_config(tmp_path):
    config = tmp_path / "config.toml"
    write_default_config(config)
    add_runtime(config, "ml", tmp_path / "v1")
    add_runtime(config, "cv", tmp_path / "v2")
    add_runtime(config, "ml", tmp_path / "v3")  # replaces, never duplicates
    loaded = load_config_file(config, NodeConfig(data_dir=tmp_path))
    assert loaded.runtimes == (("ml", str(tmp_path / "v3")), ("cv", str(tmp_path / "v2")))
    assert loaded.price_sheet == NodeConfig(data_dir=tmp_path).price_sheet  # the rest of the file is intact
