"""Every message of the Coop market, as frozen, validated dataclasses.

Values are integers throughout: times are Unix milliseconds, sizes are bytes, prices are milli-credits, loads are
per-mille. Each top-level message has a ``TYPE`` (its wire name), a ``MAX_BYTES`` hard cap, and a ``SIGNER``:
the name of the field holding the peer id that must have signed it (checked by :mod:`protocol.envelope`).
Agreements and Receipts carry two signatures of their own (see :mod:`protocol.cosign`).

Construction validates ranges and lengths and raises :class:`~protocol.errors.LocalProtocolError`; the codec
turns that into :class:`~protocol.errors.MalformedMessage` when the values came from a peer.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import ClassVar, Final, final

from protocol.codec import register
from protocol.errors import InvalidKey, LocalProtocolError
from protocol.identity import SIGNATURE_BYTES, public_key_from_peer_id

MAX_JOB_ID_CHARS: Final = 64
MAX_TEXT_CHARS: Final = 1024
MAX_COMMAND_ARGS: Final = 256
MAX_ARG_CHARS: Final = 4096
MAX_ENV_VARS: Final = 64
MAX_FILES: Final = 256
# A file name's UTF-8 bytes: NAME_MAX (255) less room for the ".part" suffix a transfer writes first.
MAX_NAME_BYTES: Final = 250
MAX_ADDRS: Final = 16
MAX_GPUS: Final = 64
MAX_ROUNDS_ON_WIRE: Final = 16
MAX_U64: Final = (1 << 64) - 1
DIGEST_BYTES: Final = 32
MAX_RUNTIMES: Final = 16
MAX_RUNTIME_NAME_CHARS: Final = 32
MAX_INTERPRETER_CHARS: Final = 64
# Fields added after version 1 of a message: left out of the encoding while they hold their default, so a message
# that does not use them is byte-for-byte what an older node sends and accepts (see protocol.codec.to_plain).
OMIT_DEFAULT: Final = {"omit_default": True}


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise LocalProtocolError(message)


def _peer(value: str, name: str) -> None:
    try:
        public_key_from_peer_id(value)
    except InvalidKey as exc:
        raise LocalProtocolError(f"{name}: {exc}") from exc


def _uint(value: int, name: str, *, maximum: int = MAX_U64) -> None:
    _require(0 <= value <= maximum, f"{name} must be in [0, {maximum}], got {value}")


def _text(value: str, name: str, *, maximum: int = MAX_TEXT_CHARS, empty: bool = True) -> None:
    _require(len(value) <= maximum, f"{name} longer than {maximum} characters")
    _require(empty or bool(value), f"{name} must not be empty")


def _job_id(value: str) -> None:
    _require(
        0 < len(value) <= MAX_JOB_ID_CHARS and all(c.isalnum() or c in "-_" for c in value) and value.isascii(),
        f"job id must be 1-{MAX_JOB_ID_CHARS} ASCII letters, digits, '-' or '_'",
    )


def _digest(value: bytes, name: str) -> None:
    _require(len(value) == DIGEST_BYTES, f"{name} must be a {DIGEST_BYTES}-byte sha256 digest")


def _signature(value: bytes, name: str) -> None:
    _require(len(value) in (0, SIGNATURE_BYTES), f"{name} must be empty or {SIGNATURE_BYTES} bytes")


def file_name_ok(name: str) -> bool:
    """A job file name: one path component, no traversal, printable, at most MAX_NAME_BYTES in UTF-8."""
    try:
        size = len(name.encode())
    except UnicodeEncodeError:  # a lone surrogate: not a name any file system here can store
        return False
    return (
        0 < size <= MAX_NAME_BYTES
        and name not in (".", "..")
        and "/" not in name
        and "\x00" not in name
        and name.isprintable()
    )


def runtime_name_ok(name: str) -> bool:
    """A runtime name: 1-32 of lowercase ASCII letters, digits, '.', '_' or '-', starting with a letter."""
    return (
        0 < len(name) <= MAX_RUNTIME_NAME_CHARS
        and "a" <= name[0] <= "z"
        and all("a" <= c <= "z" or "0" <= c <= "9" or c in "._-" for c in name)
    )


class RejectCode(enum.StrEnum):
    """Why a negotiation (or a job) was refused. Sent to peers: no local detail."""

    BUSY = "busy"
    INSUFFICIENT_RESOURCES = "insufficient-resources"
    BELOW_FLOOR = "below-floor"
    ABOVE_MAX_PRICE = "above-max-price"
    BLOCKED_PEER = "blocked-peer"
    QUOTE_EXPIRED = "quote-expired"
    ROUNDS_EXHAUSTED = "rounds-exhausted"
    BAD_REQUEST = "bad-request"
    BAD_SIGNATURE = "bad-signature"
    TIMEOUT = "timeout"
    UNSUPPORTED = "unsupported"
    WITHDRAWN = "withdrawn"
    UNKNOWN_AGREEMENT = "unknown-agreement"
    AGREEMENT_USED = "agreement-used"
    BAD_INPUT = "bad-input"
    BAD_RECEIPT = "bad-receipt"
    BAD_RESULT = "bad-result"
    INTERNAL = "internal"
    PREEMPTED = "preempted"  # the provider's owner took the machine back mid-job: retry elsewhere
    NO_RUNTIME = "no-runtime"
    NO_RECEIPT = "no-receipt"  # /coop/receipt/1.0.0: this node holds no countersigned receipt of yours for that job


class Termination(enum.StrEnum):
    """How a job's process ended."""

    EXITED = "exited"
    CPU_LIMIT = "cpu-limit"
    MEMORY_LIMIT = "memory-limit"
    WALL_TIMEOUT = "wall-timeout"
    OUTPUT_LIMIT = "output-limit"
    DISK_LIMIT = "disk-limit"
    CANCELLED = "cancelled"
    SANDBOX_ERROR = "sandbox-error"


class Outcome(enum.StrEnum):
    """What a rater says happened in a job."""

    SUCCESS = "success"
    PROVIDER_FAILURE = "provider-failure"
    CLIENT_FAILURE = "client-failure"
    TIMEOUT = "timeout"
    BAD_RESULT = "bad-result"


# ---------------------------------------------------------------------------------------------------- structs


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class PriceSheet:
    """Prices in milli-credits: a fixed start fee, then per CPU-second, per GiB-second of memory, per GPU-second."""

    start_fee: int = 0
    per_cpu_second: int = 0
    per_gib_second: int = 0
    per_gpu_second: int = 0

    def __post_init__(self) -> None:
        for name in ("start_fee", "per_cpu_second", "per_gib_second", "per_gpu_second"):
            _uint(getattr(self, name), name, maximum=1 << 40)


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class GpuSpec:
    model: str
    memory_bytes: int

    def __post_init__(self) -> None:
        _text(self.model, "gpu model", maximum=128)
        _uint(self.memory_bytes, "gpu memory_bytes")


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class Runtime:
    """A software environment a provider offers (a venv or a root filesystem tree, bound read-only into jobs).

    ``interpreter`` names its Python, e.g. ``cpython-3.11.7``; ``lock_sha256`` is the sha256 of its lock (the
    ``pip freeze`` of the venv), empty when unknown. Jobs name a runtime and may pin its lock hash.
    """

    name: str
    interpreter: str = ""
    lock_sha256: bytes = b""

    def __post_init__(self) -> None:
        _require(runtime_name_ok(self.name), f"bad runtime name {self.name[:40]!r}")
        _text(self.interpreter, "interpreter", maximum=MAX_INTERPRETER_CHARS)
        _require(self.lock_sha256 == b"" or len(self.lock_sha256) == DIGEST_BYTES, "lock_sha256: 0 or 32 bytes")


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class Resources:
    """What a job asks for. ``gpu_model`` is a case-insensitive substring filter; empty means any.

    ``runtime`` names the provider runtime the job runs in (empty: plain commands on the provider's system);
    ``runtime_sha256``, when set, pins that runtime's lock hash.
    """

    cpus: int = 1
    memory_bytes: int = 256 << 20
    disk_bytes: int = 1 << 30
    gpus: int = 0
    gpu_model: str = ""
    runtime: str = field(default="", metadata=OMIT_DEFAULT)
    runtime_sha256: bytes = field(default=b"", metadata=OMIT_DEFAULT)

    def __post_init__(self) -> None:
        _require(1 <= self.cpus <= 4096, "cpus must be in [1, 4096]")
        _uint(self.memory_bytes, "memory_bytes")
        _uint(self.disk_bytes, "disk_bytes")
        _uint(self.gpus, "gpus", maximum=MAX_GPUS)
        _text(self.gpu_model, "gpu_model", maximum=128)
        _require(self.runtime == "" or runtime_name_ok(self.runtime), f"bad runtime name {self.runtime[:40]!r}")
        _require(self.runtime_sha256 == b"" or len(self.runtime_sha256) == DIGEST_BYTES, "runtime_sha256: 32 bytes")
        _require(bool(self.runtime) or not self.runtime_sha256, "runtime_sha256 needs a runtime")


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Hard limits the provider enforces on a job."""

    cpu_seconds: int = 600
    wall_seconds: int = 600
    memory_bytes: int = 256 << 20
    disk_bytes: int = 1 << 30
    output_bytes: int = 16 << 20

    def __post_init__(self) -> None:
        _require(1 <= self.wall_seconds <= 7 * 86400, "wall_seconds must be in [1, 604800]")
        _require(1 <= self.cpu_seconds <= 4096 * 7 * 86400, "cpu_seconds out of range")
        for name in ("memory_bytes", "disk_bytes", "output_bytes"):
            _uint(getattr(self, name), name)


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class FileRef:
    """A file by name, sha256 digest and size."""

    name: str
    sha256: bytes
    size: int

    def __post_init__(self) -> None:
        _require(file_name_ok(self.name), f"bad file name {self.name[:40]!r}")
        _digest(self.sha256, "sha256")
        _uint(self.size, "size")


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class Usage:
    """Metered usage of one job."""

    cpu_ms: int = 0
    wall_ms: int = 0
    peak_memory_bytes: int = 0
    gpu_ms: int = 0

    def __post_init__(self) -> None:
        for name in ("cpu_ms", "wall_ms", "peak_memory_bytes", "gpu_ms"):
            _uint(getattr(self, name), name)


# ---------------------------------------------------------------------------------------------------- messages


@final
@register
@dataclass(frozen=True, slots=True, kw_only=True)
class CapacityAd:
    """What a provider offers, stored in the DHT under its own key (signed envelope: issued/expiry there)."""

    TYPE: ClassVar[str] = "capacity-ad"
    MAX_BYTES: ClassVar[int] = 8 << 10
    SIGNER: ClassVar[str] = "peer"

    peer: str
    seq: int
    cpus: int
    memory_bytes: int
    disk_bytes: int
    gpus: tuple[GpuSpec, ...] = ()
    sandbox_tier: str = "none"
    runtimes: tuple[Runtime, ...] = ()
    price_sheet: PriceSheet = field(default_factory=PriceSheet)
    load_permille: int = 0
    addrs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _peer(self.peer, "peer")
        _uint(self.seq, "seq")
        _uint(self.cpus, "cpus", maximum=4096)
        _uint(self.memory_bytes, "memory_bytes")
        _uint(self.disk_bytes, "disk_bytes")
        _require(len(self.gpus) <= MAX_GPUS, "too many GPUs")
        _text(self.sandbox_tier, "sandbox_tier", maximum=32)
        _require(len(self.runtimes) <= MAX_RUNTIMES, f"at most {MAX_RUNTIMES} runtimes")
        _require(len({r.name for r in self.runtimes}) == len(self.runtimes), "duplicate runtime names")
        _uint(self.load_permille, "load_permille", maximum=100_000)
        _require(len(self.addrs) <= MAX_ADDRS and all(0 < len(a) <= 256 for a in self.addrs), "bad addrs")


@final
@register
@dataclass(frozen=True, slots=True, kw_only=True)
class QuoteRequest:
    """A client asks a provider for a price to run a job with these resources and limits."""

    TYPE: ClassVar[str] = "quote-request"
    MAX_BYTES: ClassVar[int] = 4 << 10
    SIGNER: ClassVar[str] = "client"

    job_id: str
    client: str
    resources: Resources
    limits: Limits
    max_price: int  # the most the client will pay for the whole job, milli-credits
    deadline: int  # ms: the job must finish by then

    def __post_init__(self) -> None:
        _job_id(self.job_id)
        _peer(self.client, "client")
        _uint(self.max_price, "max_price")
        _uint(self.deadline, "deadline")


@final
@register
@dataclass(frozen=True, slots=True, kw_only=True)
class Quote:
    """A provider's signed offer for one request, valid until ``valid_until``."""

    TYPE: ClassVar[str] = "quote"
    MAX_BYTES: ClassVar[int] = 4 << 10
    SIGNER: ClassVar[str] = "provider"

    job_id: str
    provider: str
    request_hash: bytes
    price_sheet: PriceSheet
    valid_until: int
    load_permille: int
    round: int = 0

    def __post_init__(self) -> None:
        _job_id(self.job_id)
        _peer(self.provider, "provider")
        _digest(self.request_hash, "request_hash")
        _uint(self.valid_until, "valid_until")
        _uint(self.load_permille, "load_permille", maximum=100_000)
        _uint(self.round, "round", maximum=MAX_ROUNDS_ON_WIRE)


@final
@register
@dataclass(frozen=True, slots=True, kw_only=True)
class Counter:
    """A client's counter-offer to a quote: the price sheet it proposes instead (higher or lower)."""

    TYPE: ClassVar[str] = "counter"
    MAX_BYTES: ClassVar[int] = 4 << 10
    SIGNER: ClassVar[str] = "client"

    job_id: str
    client: str
    quote_hash: bytes
    price_sheet: PriceSheet
    round: int

    def __post_init__(self) -> None:
        _job_id(self.job_id)
        _peer(self.client, "client")
        _digest(self.quote_hash, "quote_hash")
        _uint(self.round, "round", maximum=MAX_ROUNDS_ON_WIRE)


@final
@register
@dataclass(frozen=True, slots=True, kw_only=True)
class Reject:
    """A refusal with a machine-readable reason code and a human message (no local detail)."""

    TYPE: ClassVar[str] = "reject"
    MAX_BYTES: ClassVar[int] = 2 << 10
    SIGNER: ClassVar[str] = "peer"

    job_id: str
    peer: str
    code: RejectCode
    message: str = ""
    retryable: bool = False

    def __post_init__(self) -> None:
        _job_id(self.job_id)
        _peer(self.peer, "peer")
        _text(self.message, "message", maximum=512)


@final
@register
@dataclass(frozen=True, slots=True, kw_only=True)
class Agreement:
    """The deal: hash-linked to the request and the accepted quote, signed by both sides (see cosign)."""

    TYPE: ClassVar[str] = "agreement"
    MAX_BYTES: ClassVar[int] = 4 << 10

    job_id: str
    client: str
    provider: str
    request_hash: bytes
    quote_hash: bytes
    price_sheet: PriceSheet
    resources: Resources
    limits: Limits
    max_cost: int
    client_signature: bytes = b""
    provider_signature: bytes = b""

    def __post_init__(self) -> None:
        _job_id(self.job_id)
        _peer(self.client, "client")
        _peer(self.provider, "provider")
        _digest(self.request_hash, "request_hash")
        _digest(self.quote_hash, "quote_hash")
        _uint(self.max_cost, "max_cost")
        _signature(self.client_signature, "client_signature")
        _signature(self.provider_signature, "provider_signature")


@final
@register
@dataclass(frozen=True, slots=True, kw_only=True)
class Accept:
    """The client accepts a quote: its signature over the Agreement both sides derive from request and quote."""

    TYPE: ClassVar[str] = "accept"
    MAX_BYTES: ClassVar[int] = 2 << 10
    SIGNER: ClassVar[str] = "client"

    job_id: str
    client: str
    quote_hash: bytes
    client_signature: bytes

    def __post_init__(self) -> None:
        _job_id(self.job_id)
        _peer(self.client, "client")
        _digest(self.quote_hash, "quote_hash")
        _require(len(self.client_signature) == SIGNATURE_BYTES, "client_signature must be 64 bytes")


@final
@register
@dataclass(frozen=True, slots=True, kw_only=True)
class JobSpec:
    """What to run: argv, environment, inputs by digest, expected outputs, limits, GPUs granted."""

    TYPE: ClassVar[str] = "job-spec"
    MAX_BYTES: ClassVar[int] = 256 << 10
    SIGNER: ClassVar[str] = "client"

    job_id: str
    client: str
    agreement_hash: bytes
    command: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    inputs: tuple[FileRef, ...] = ()
    outputs: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)
    gpus: int = 0

    def __post_init__(self) -> None:
        _job_id(self.job_id)
        _peer(self.client, "client")
        _digest(self.agreement_hash, "agreement_hash")
        _require(0 < len(self.command) <= MAX_COMMAND_ARGS, f"command must have 1-{MAX_COMMAND_ARGS} args")
        _require(all(len(a) <= MAX_ARG_CHARS and "\x00" not in a for a in self.command), "bad command arg")
        _require(len(self.env) <= MAX_ENV_VARS, f"at most {MAX_ENV_VARS} env vars")
        for k, v in self.env.items():
            _require(0 < len(k) <= 128 and "=" not in k and "\x00" not in k, f"bad env name {k[:40]!r}")
            _require(len(v) <= MAX_ARG_CHARS and "\x00" not in v, f"bad env value for {k[:40]!r}")
        _require(len(self.inputs) <= MAX_FILES and len(self.outputs) <= MAX_FILES, "too many files")
        names = [f.name for f in self.inputs]
        _require(len(set(names)) == len(names), "duplicate input names")
        _require(all(file_name_ok(n) for n in self.outputs), "bad output name")
        _uint(self.gpus, "gpus", maximum=MAX_GPUS)


@final
@register
@dataclass(frozen=True, slots=True, kw_only=True)
class JobResult:
    """How a job ended: exit status, why, output digests, metered usage."""

    TYPE: ClassVar[str] = "job-result"
    MAX_BYTES: ClassVar[int] = 64 << 10
    SIGNER: ClassVar[str] = "provider"

    job_id: str
    provider: str
    exit_status: int
    termination: Termination
    outputs: tuple[FileRef, ...] = ()
    usage: Usage = field(default_factory=Usage)
    stdout_sha256: bytes = b"\x00" * DIGEST_BYTES
    stderr_sha256: bytes = b"\x00" * DIGEST_BYTES

    def __post_init__(self) -> None:
        _job_id(self.job_id)
        _peer(self.provider, "provider")
        _require(-255 <= self.exit_status <= 255, "exit_status must be in [-255, 255]")
        _require(len(self.outputs) <= MAX_FILES, "too many outputs")
        _digest(self.stdout_sha256, "stdout_sha256")
        _digest(self.stderr_sha256, "stderr_sha256")


@final
@register
@dataclass(frozen=True, slots=True, kw_only=True)
class Receipt:
    """Proof that a job ran and what it cost, signed by both sides (see cosign)."""

    TYPE: ClassVar[str] = "receipt"
    MAX_BYTES: ClassVar[int] = 4 << 10

    job_id: str
    client: str
    provider: str
    agreement_hash: bytes
    result_hash: bytes
    usage: Usage
    cost: int
    issued_at: int
    client_signature: bytes = b""
    provider_signature: bytes = b""

    def __post_init__(self) -> None:
        _job_id(self.job_id)
        _peer(self.client, "client")
        _peer(self.provider, "provider")
        _digest(self.agreement_hash, "agreement_hash")
        _digest(self.result_hash, "result_hash")
        _uint(self.cost, "cost")
        _uint(self.issued_at, "issued_at")
        _signature(self.client_signature, "client_signature")
        _signature(self.provider_signature, "provider_signature")


@final
@register
@dataclass(frozen=True, slots=True, kw_only=True)
class ReceiptQuery:
    """A provider asks a client for the countersigned receipt of a run whose job stream broke before the client's
    signature arrived (``/coop/receipt/1.0.0``). A bare frame: the stream authenticates the asker, and the client
    only ever answers with a receipt naming that asker as the provider."""

    TYPE: ClassVar[str] = "receipt-query"
    MAX_BYTES: ClassVar[int] = 256

    job_id: str

    def __post_init__(self) -> None:
        _job_id(self.job_id)


@final
@register
@dataclass(frozen=True, slots=True, kw_only=True)
class ReputationRecord:
    """One party's rating of the other for one job, bound to the job's receipt."""

    TYPE: ClassVar[str] = "reputation-record"
    MAX_BYTES: ClassVar[int] = 2 << 10
    SIGNER: ClassVar[str] = "rater"

    rater: str
    ratee: str
    receipt_hash: bytes
    outcome: Outcome
    score: int  # 0 (worst) .. 100 (best)
    time: int
    comment: str = ""

    def __post_init__(self) -> None:
        _peer(self.rater, "rater")
        _peer(self.ratee, "ratee")
        _require(self.rater != self.ratee, "a peer cannot rate itself")
        _digest(self.receipt_hash, "receipt_hash")
        _uint(self.score, "score", maximum=100)
        _uint(self.time, "time")
        _text(self.comment, "comment", maximum=280)


class ChunkKind(enum.StrEnum):
    INPUT = "input"
    OUTPUT = "output"
    STDOUT = "stdout"
    STDERR = "stderr"
    HEARTBEAT = "heartbeat"


MAX_CHUNK_BYTES: Final = 256 << 10  # 256 KiB of data per frame


@final
@register
@dataclass(frozen=True, slots=True, kw_only=True)
class Chunk:
    """A piece of a file or of a log on the job stream. Authenticated by the stream (Noise) and, for files, by
    the digests in the signed JobSpec / JobResult; so it is sent as a bare frame, not an envelope."""

    TYPE: ClassVar[str] = "chunk"
    MAX_BYTES: ClassVar[int] = MAX_CHUNK_BYTES + 1024

    job_id: str
    kind: ChunkKind
    name: str = ""
    data: bytes = b""

    def __post_init__(self) -> None:
        _job_id(self.job_id)
        _require(len(self.data) <= MAX_CHUNK_BYTES, f"chunk data over {MAX_CHUNK_BYTES} bytes")
        _require(self.name == "" or file_name_ok(self.name), "bad chunk file name")


@final
@register
@dataclass(frozen=True, slots=True, kw_only=True)
class JobAccepted:
    """The provider admitted a JobSpec and is ready for its inputs."""

    TYPE: ClassVar[str] = "job-accepted"
    MAX_BYTES: ClassVar[int] = 512
    SIGNER: ClassVar[str] = "provider"

    job_id: str
    provider: str

    def __post_init__(self) -> None:
        _job_id(self.job_id)
        _peer(self.provider, "provider")
