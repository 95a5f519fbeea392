"""Job submissions from the local API: parsed and validated before anything is stored or sent."""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from protocol.errors import LocalProtocolError
from protocol.messages import (
    MAX_ARG_CHARS,
    MAX_COMMAND_ARGS,
    MAX_ENV_VARS,
    MAX_FILES,
    MAX_NAME_BYTES,
    Limits,
    Resources,
    file_name_ok,
    runtime_name_ok,
)

DEFAULT_MAX_PRICE: Final = 100_000  # milli-credits (100 credits)
MAX_INLINE_INPUT_BYTES: Final = 64 << 20


class BadSubmission(ValueError):
    """The submission is invalid; the message says which field and why (HTTP 400)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class InputSource:
    name: str
    path: Path | None = None
    data: bytes | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SubmitRequest:
    command: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    limits: Limits = field(default_factory=Limits)
    max_price: int = DEFAULT_MAX_PRICE
    inputs: tuple[InputSource, ...] = ()
    outputs: tuple[str, ...] = ()
    job_id: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "command": list(self.command),
            "env": self.env,
            "cpus": self.resources.cpus,
            "memory_bytes": self.resources.memory_bytes,
            "disk_bytes": self.resources.disk_bytes,
            "gpus": self.resources.gpus,
            "gpu_model": self.resources.gpu_model,
            "runtime": self.resources.runtime,
            "runtime_sha256": self.resources.runtime_sha256.hex(),
            "timeout": self.limits.wall_seconds,
            "cpu_seconds": self.limits.cpu_seconds,
            "output_bytes": self.limits.output_bytes,
            "max_price": self.max_price,
            "inputs": [i.name for i in self.inputs],
            "outputs": list(self.outputs),
        }


def _int(body: dict[str, Any], key: str, default: int, *, minimum: int = 0, maximum: int = 1 << 62) -> int:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise BadSubmission(f"{key} must be an integer in [{minimum}, {maximum}]")
    return value


def _name_ok(name: object) -> bool:
    return isinstance(name, str) and file_name_ok(name)


def _utf8(text: str) -> bool:
    """JSON escapes can make lone surrogates, which no wire message can carry (msgpack strings are UTF-8)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _arg_ok(text: str) -> bool:
    return len(text) <= MAX_ARG_CHARS and "\x00" not in text and _utf8(text)


def _hex(text: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in text)


def new_job_id() -> str:
    return "j" + uuid.uuid4().hex[:20]


def parse_submission(body: object) -> SubmitRequest:
    """Validate a JSON submission (see docs in README: command, resources, limits, inputs, outputs)."""
    if not isinstance(body, dict):
        raise BadSubmission("the body must be a JSON object")
    known = {"command", "env", "cpus", "memory_bytes", "disk_bytes", "gpus", "gpu_model", "timeout", "cpu_seconds",
             "output_bytes", "max_price", "inputs", "outputs", "job_id", "runtime", "runtime_sha256"}  # fmt: skip
    unknown = set(body) - known
    if unknown:
        raise BadSubmission(f"unknown field(s): {', '.join(sorted(unknown))}")
    # The limits of the JobSpec this becomes (protocol/messages.py): caught here, not when the job is sent.
    command = body.get("command")
    if not isinstance(command, list) or not 0 < len(command) <= MAX_COMMAND_ARGS:
        raise BadSubmission(f"command must be a list of 1 to {MAX_COMMAND_ARGS} strings")
    if not all(isinstance(a, str) and _arg_ok(a) for a in command):
        raise BadSubmission(f"each argument of command must be a string of at most {MAX_ARG_CHARS} characters, no NUL")
    env = body.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise BadSubmission("env must map strings to strings")
    if len(env) > MAX_ENV_VARS or not all(0 < len(k) <= 128 and "=" not in k and _arg_ok(k) and _arg_ok(v)
                                          for k, v in env.items()):  # fmt: skip
        raise BadSubmission(f"env: at most {MAX_ENV_VARS} variables, names of 1-128 characters without '=' or NUL")
    gpu_model = body.get("gpu_model", "")
    if not isinstance(gpu_model, str) or len(gpu_model) > 128 or not _utf8(gpu_model):
        raise BadSubmission("gpu_model must be a string of at most 128 characters")
    runtime = body.get("runtime", "")
    if not isinstance(runtime, str) or (runtime and not runtime_name_ok(runtime)):
        raise BadSubmission("runtime must be a runtime name: 1-32 of a-z, 0-9, '.', '_', '-', starting with a-z")
    pin = body.get("runtime_sha256", "")
    if not isinstance(pin, str) or (pin and (len(pin) != 64 or not _hex(pin))) or (pin and not runtime):
        raise BadSubmission("runtime_sha256 must be 64 hex digits (a lock hash), given with a runtime")
    cpus = _int(body, "cpus", 1, minimum=1, maximum=4096)
    memory = _int(body, "memory_bytes", 512 << 20, minimum=1 << 20)
    timeout = _int(body, "timeout", 600, minimum=1, maximum=7 * 86400)
    try:
        resources = Resources(
            cpus=cpus,
            memory_bytes=memory,
            disk_bytes=_int(body, "disk_bytes", 1 << 30, minimum=1 << 20),
            gpus=_int(body, "gpus", 0, maximum=64),
            gpu_model=gpu_model,
            runtime=runtime,
            runtime_sha256=bytes.fromhex(pin),
        )
        limits = Limits(
            cpu_seconds=_int(body, "cpu_seconds", cpus * timeout, minimum=1),
            wall_seconds=timeout,
            memory_bytes=memory,
            disk_bytes=resources.disk_bytes,
            output_bytes=_int(body, "output_bytes", 16 << 20, minimum=1024),
        )
    except LocalProtocolError as exc:
        raise BadSubmission(str(exc)) from exc
    inputs = []
    raw_inputs = body.get("inputs", [])
    if not isinstance(raw_inputs, list) or len(raw_inputs) > MAX_FILES:
        raise BadSubmission(f"inputs must be a list of at most {MAX_FILES} {{name, path}} or {{name, data_b64}}")
    for item in raw_inputs:
        if not isinstance(item, dict) or not _name_ok(item.get("name")):
            raise BadSubmission(f"each input needs a plain file name (no '/', at most {MAX_NAME_BYTES} bytes)")
        if isinstance(item.get("path"), str):
            path = Path(item["path"])
            if not path.is_absolute() or not path.is_file():
                raise BadSubmission(f"input {item['name']!r}: {path} is not an existing file (absolute path)")
            inputs.append(InputSource(name=item["name"], path=path))
        elif isinstance(item.get("data_b64"), str):
            try:
                data = base64.b64decode(item["data_b64"], validate=True)
            except (binascii.Error, ValueError) as exc:
                raise BadSubmission(f"input {item['name']!r}: data_b64 is not base64") from exc
            if len(data) > MAX_INLINE_INPUT_BYTES:
                raise BadSubmission(f"input {item['name']!r}: inline data over 64 MiB, pass a path instead")
            inputs.append(InputSource(name=item["name"], data=data))
        else:
            raise BadSubmission(f"input {item['name']!r} needs a path or data_b64")
    if len({i.name for i in inputs}) != len(inputs):
        raise BadSubmission("input names must be distinct")
    outputs = body.get("outputs", [])
    if not isinstance(outputs, list) or len(outputs) > MAX_FILES or not all(_name_ok(o) for o in outputs):
        raise BadSubmission(f"outputs must be a list of at most {MAX_FILES} plain file names")
    job_id = body.get("job_id", "")
    if not isinstance(job_id, str) or (job_id and not (job_id.isascii() and job_id.replace("-", "").isalnum())):
        raise BadSubmission("job_id must be letters, digits and '-'")
    if re.search(r"-v\d+$", job_id):
        raise BadSubmission("job_id must not end in -v<digits> (reserved for verification replicas)")
    return SubmitRequest(
        command=tuple(command),
        env=dict(env),
        resources=resources,
        limits=limits,
        max_price=_int(body, "max_price", DEFAULT_MAX_PRICE),
        inputs=tuple(inputs),
        outputs=tuple(dict.fromkeys(outputs)),
        job_id=job_id[:64],
    )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
