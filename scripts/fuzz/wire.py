"""Coverage-guided fuzzing (atheris, i.e. libFuzzer) of everything a peer's bytes reach before any trio code runs.

Usage::

    .venv/bin/pip install atheris                                    # a wheel for CPython 3.11 on x86-64 Linux
    .venv/bin/python scripts/fuzz/wire.py -max_total_time=600         # ten minutes, from an empty corpus
    .venv/bin/python scripts/fuzz/wire.py /tmp/coop-fuzz-corpus -max_total_time=600   # keep (and seed) a corpus
    .venv/bin/python scripts/fuzz/wire.py /tmp/coop-fuzz-crash-1234abcd               # replay one finding

Any other libFuzzer flag works too (``-jobs=4 -workers=4``, ``-max_len=65536``...). A corpus directory given as
the first argument is seeded, when empty, with every valid frame of ``tests/factories.py`` in every mode.
Findings are written to ``$TMPDIR/coop-fuzz-crash-*`` (not into the working tree) unless ``-artifact_prefix=``
says otherwise; unless ``-dict=`` is given, a dictionary of msgpack markers, 64-bit boundary values and every
message type and field name is generated and used. Scratch files (a SQLite store, the dictionary) go to
``$TMPDIR/coop-fuzz-*/``.

Each input's first byte picks what is fuzzed; the rest is the peer's bytes:

0. ``codec.decode`` of any frame, as any registered type and as one type the input picks.
1. The same frames through the stream reassembler (``protocol.framing.FrameBuffer``), split where the input says:
   "whole or byte by byte".
2. ``Messenger.receive`` (node/market/wire.py) with the expected types of ``/coop/negotiate``, ``/coop/job``,
   ``/coop/sync`` and the job stream: size cap, decode, envelope signature, signer binding, expiry, replay.
3. As 2, but the input is the *payload* of an envelope this harness signs with the channel peer's key, so the
   fuzzer gets past the signature check into the payload decoders and ``open_envelope``'s later checks.
4. ``ReputationService.validate_gossip`` on raw bytes, and storing what it accepts (as ``consume_gossip`` does).
5. As 4, but record and receipt come from the input and are signed by two real identities (colluding peers can
   sign anything), so the fuzzer reaches ``verify_bundle``'s checks and the records table.
6. The negotiation machines (``ProviderNegotiation`` with a real ``MarketPolicy``, and ``ClientNegotiation``)
   talking to each other, fed messages decoded from the input, correct Accepts and Counters built by the harness
   (the input cannot sign), and timeouts.

Modes 5 and 6 read the input as length-prefixed chunks (see ``Reader``); ``seed()`` shows the layout.

The invariant: the peer-facing calls raise nothing but ``RemoteProtocolError``; the machines raise nothing at all.
Any other exception is a finding: libFuzzer stops, prints the traceback and writes the input to a crash file.

Open finding: a map with an unknown ``str`` key and an unknown ``bytes`` key makes ``codec.decode`` raise
TypeError (``sorted()`` in ``_from_plain``'s error message); until protocol/codec.py is fixed, runs stop on it
within minutes (``tests/test_fuzz_wire.py::test_a_map_with_both_str_and_bytes_keys_is_malformed``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import sys
import tempfile
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, Final

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports(include=["protocol", "node"]):
    from node.market.wire import MAX_FRAME_BYTES, Messenger
    from node.reputation.records import RecordStore
    from node.reputation.service import ReputationService
    from node.store import Store
    from protocol import codec, envelope
    from protocol.cosign import sign_as, terms_hash
    from protocol.errors import LocalProtocolError, OversizedFrame, RemoteProtocolError
    from protocol.framing import FrameBuffer
    from protocol.identity import Identity
    from protocol.market import MarketPolicy
    from protocol.messages import (
        Accept,
        Agreement,
        Chunk,
        Counter,
        JobAccepted,
        JobResult,
        JobSpec,
        PriceSheet,
        Quote,
        QuoteRequest,
        Receipt,
        Reject,
        ReputationRecord,
        Usage,
    )
    from protocol.negotiation import ClientNegotiation, ProviderNegotiation, Send, agreement_for
    from protocol.reputation import RaterLimits, SyncRequest, SyncResponse, make_bundle

NOW: Final = 1_790_000_000_000
CLIENT: Final = Identity.from_seed(b"C" * 32)
PROVIDER: Final = Identity.from_seed(b"P" * 32)
EXPECTED: Final[list[tuple[type[Any], ...]]] = [
    (QuoteRequest, Counter, Accept, Reject),  # the provider on /coop/negotiate
    (Quote, Reject, Agreement),  # the client on /coop/negotiate
    (JobSpec,),  # the provider on /coop/job
    (JobAccepted, Reject),
    (Chunk, JobResult, Reject),
    (Receipt, Reject),
    (SyncRequest,),
    (SyncResponse,),
]
SIGNED: Final = [cls for cls in codec.registered_types().values() if hasattr(cls, "SIGNER")]
MODES: Final = 7


class Channel:
    """A frame channel whose receive() returns one given frame without suspending (so no event loop is needed)."""

    remote_peer = CLIENT.peer_id

    def __init__(self, frame: bytes) -> None:
        self.frame = frame

    async def receive(self, max_bytes: int) -> bytes:
        if len(self.frame) > max_bytes:
            raise OversizedFrame("over the channel's cap")  # what MemoryChannel / receive_frame raise
        return self.frame


def run_sync(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never suspends (Messenger.receive on a Channel) to its end."""
    try:
        coroutine.send(None)
    except StopIteration as stop:
        return stop.value
    raise RuntimeError("the coroutine suspended")


SCRATCH: Final = Path(tempfile.mkdtemp(prefix="coop-fuzz-"))  # the records table and the dictionary
store = Store.open(SCRATCH / "coop.db")
reputation = ReputationService(identity=PROVIDER, records=RecordStore(store.db), clock_ms=lambda: NOW)
messenger = Messenger(PROVIDER, lambda: NOW)


def reset() -> None:
    """Forget what earlier inputs left (replay cache, records, rate limits): each input runs alone, as libFuzzer
    needs, and with a fixed clock nothing would ever expire from them."""
    global messenger
    messenger = Messenger(PROVIDER, lambda: NOW)
    if reputation.records.count():
        with store.db:
            store.db.execute("DELETE FROM reputation_records")
    reputation.limits = RaterLimits()
    reputation.rejected.clear()
    reputation._changed()


def remote_errors_only(call: Any, *args: Any, **kwargs: Any) -> Any:
    with contextlib.suppress(RemoteProtocolError):
        return call(*args, **kwargs)
    return None


TYPES: Final = list(codec.registered_types().values())


def mode_decode(data: bytes) -> None:
    remote_errors_only(codec.decode, data)
    if data:  # and as one type (chosen by the last byte, which the frame's own parsing rarely depends on)
        remote_errors_only(codec.decode, data, TYPES[data[-1] % len(TYPES)])


def mode_split(fdp: atheris.FuzzedDataProvider) -> None:
    buffer = FrameBuffer(max_bytes=fdp.ConsumeIntInRange(0, 1 << 16))
    with contextlib.suppress(RemoteProtocolError):  # an oversized announcement ends the stream
        while fdp.remaining_bytes():
            for frame in buffer.feed(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))):
                remote_errors_only(codec.decode, frame)


def receive(frame: bytes, expected: tuple[type[Any], ...]) -> object:
    return remote_errors_only(lambda: run_sync(messenger.receive(Channel(frame), expected)))  # type: ignore[arg-type]


def mode_messenger(fdp: atheris.FuzzedDataProvider) -> None:
    expected = EXPECTED[fdp.ConsumeIntInRange(0, len(EXPECTED) - 1)]
    frame = fdp.ConsumeBytes(fdp.remaining_bytes())
    if len(frame) <= MAX_FRAME_BYTES:
        receive(frame, expected)


def signed_around(identity: Identity, payload: bytes, domain: str, issued: int, ttl: int, nonce: bytes) -> bytes:
    fields = {
        "signer": identity.public_key,
        "domain": domain,
        "payload": payload,
        "issued_at": issued,
        "expires_at": issued + ttl,
        "nonce": nonce,
    }
    signature = identity.sign(envelope._signing_bytes(**fields))  # type: ignore[arg-type]
    return codec.encode(envelope.Envelope(signature=signature, **fields))  # type: ignore[arg-type]


def mode_signed(fdp: atheris.FuzzedDataProvider) -> None:
    cls = SIGNED[fdp.ConsumeIntInRange(0, len(SIGNED) - 1)]
    issued = NOW + fdp.ConsumeIntInRange(-100_000, 100_000)
    ttl = fdp.ConsumeIntInRange(1, 200_000)
    nonce = fdp.ConsumeBytes(16).ljust(16, b"\x00")
    payload = fdp.ConsumeBytes(fdp.remaining_bytes())
    try:
        frame = signed_around(CLIENT, payload, envelope.domain_of(cls), issued, ttl, nonce)
    except LocalProtocolError:  # too big for an envelope: nobody could send it
        return
    for expected in EXPECTED:
        if cls in expected or fdp.ConsumeBool():  # where it belongs, and (some of) where it does not
            receive(frame, expected)


def store_if_valid(data: bytes) -> None:
    """What the gossip path does with one message: validate, then (if accepted) check and store it."""
    if reputation.validate_gossip(CLIENT.peer_id, data):
        verified = reputation._check(data)
        assert verified is not None, "accepted by the validator, refused by the consumer"
        reputation.records.put(verified, received_ms=NOW)
        reputation._changed()


def mode_gossip(data: bytes) -> None:
    store_if_valid(data)


class Reader:
    """Structured input read from the front (unlike FuzzedDataProvider), so that seeds are easy to write by hand:
    ``chunk()`` is a 2-byte big-endian length and that many bytes."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def int(self, size: int) -> int:
        value, self.data = int.from_bytes(self.data[:size], "big"), self.data[size:]
        return value

    def chunk(self) -> bytes:
        size = self.int(2)
        out, self.data = self.data[:size], self.data[size:]
        return out

    def rest(self) -> bytes:
        out, self.data = self.data, b""
        return out


def chunk(frame: bytes) -> bytes:
    return len(frame).to_bytes(2, "big") + frame


def mode_bundle(data: bytes) -> None:
    """A ReputationRecord chunk, then a Receipt (the rest); re-bound and signed by two real (colluding) identities."""
    reader = Reader(data)
    record = remote_errors_only(codec.decode, reader.chunk(), ReputationRecord)
    receipt = remote_errors_only(codec.decode, reader.rest(), Receipt)
    if record is None or receipt is None:
        return
    rater, ratee = (CLIENT, PROVIDER) if record.rater <= record.ratee else (PROVIDER, CLIENT)
    receipt = dataclasses.replace(receipt, client=CLIENT.peer_id, provider=PROVIDER.peer_id)
    receipt = sign_as(PROVIDER, sign_as(CLIENT, receipt, "client"), "provider")
    bound = record.receipt_hash if record.receipt_hash[0] % 4 == 0 else terms_hash(receipt)
    record = dataclasses.replace(record, rater=rater.peer_id, ratee=ratee.peer_id, receipt_hash=bound)
    store_if_valid(codec.encode(make_bundle(rater, record, receipt)))
    reputation.table()


def deliver(actions: list[Any], to: Any, now: int, hops: int = 8) -> None:
    """Carry each Send to the other machine, and its answers back, for at most ``hops`` rounds."""
    other = {id(provider_machine): client_machine, id(client_machine): provider_machine}
    for action in actions:
        if isinstance(action, Send) and to is not None and hops:
            deliver(to.receive(action.message, now), other.get(id(to)), now, hops - 1)


provider_machine: Any = None
client_machine: Any = None


def mode_negotiation(data: bytes) -> None:
    """Floor, load and free slots; a QuoteRequest chunk; then steps of (op, ms elapsed, operands)."""
    global provider_machine, client_machine
    reader = Reader(data)
    floor = PriceSheet(start_fee=reader.int(1), per_cpu_second=reader.int(1))
    policy = MarketPolicy(
        floor=floor,
        load_permille=reader.int(2) % 1001,
        cpus=8,
        memory_bytes=1 << 34,
        disk_bytes=1 << 40,
        free_slots=reader.int(1) % 3,
    )
    provider_machine = ProviderNegotiation(identity=PROVIDER, policy=policy, load_permille=policy.load_permille)
    client_machine = None
    request = remote_errors_only(codec.decode, reader.chunk())
    if isinstance(request, QuoteRequest):
        request = dataclasses.replace(request, client=CLIENT.peer_id)
        client_machine = ClientNegotiation(identity=CLIENT, request=request, provider=PROVIDER.peer_id)
        client_machine.start(NOW)
    now = NOW
    for _ in range(32):
        if not reader.data:
            break
        op, now = reader.int(1) % 5, now + reader.int(2)
        if op == 0:  # a message from the input (any type), or the request again
            message = remote_errors_only(codec.decode, reader.chunk()) if reader.int(1) % 2 else request
            if message is not None:
                deliver(provider_machine.receive(message, now), client_machine, now)
        elif op == 1 and client_machine is not None:  # the client accepts what it holds
            deliver(client_machine.accept(now), provider_machine, now)
        elif op == 2 and isinstance(request, QuoteRequest) and provider_machine.last_quote is not None:
            quote = provider_machine.last_quote  # a correct Accept, built here (the input cannot sign)
            terms = sign_as(CLIENT, agreement_for(request, quote), "client")
            accept = Accept(
                job_id=request.job_id,
                client=CLIENT.peer_id,
                client_signature=terms.client_signature,
                quote_hash=envelope.message_hash(quote),
            )
            deliver(provider_machine.receive(accept, now), client_machine, now)
        elif op == 3 and isinstance(request, QuoteRequest) and provider_machine.last_quote is not None:
            sheet = remote_errors_only(codec.from_plain, PriceSheet, {"per_cpu_second": reader.int(6)})
            if sheet is not None:
                counter = Counter(
                    job_id=request.job_id,
                    client=CLIENT.peer_id,
                    price_sheet=sheet,
                    quote_hash=envelope.message_hash(provider_machine.last_quote),
                    round=reader.int(1) % 17,
                )
                deliver(provider_machine.receive(counter, now), client_machine, now)
        else:
            provider_machine.on_timeout(now)
            if client_machine is not None:
                client_machine.on_timeout(now)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    reset()
    mode, rest = data[0] % MODES, data[1:]
    fdp = atheris.FuzzedDataProvider(rest)
    if mode == 0:
        mode_decode(rest)
    elif mode == 1:
        mode_split(fdp)
    elif mode == 2:
        mode_messenger(fdp)
    elif mode == 3:
        mode_signed(fdp)
    elif mode == 4:
        mode_gossip(rest)
    elif mode == 5:
        mode_bundle(rest)
    else:
        mode_negotiation(rest)


def seed(corpus: Path) -> None:
    """Fill an empty corpus dir: every valid frame of the test factories under every mode byte, and structured
    inputs for the bundle and negotiation modes."""
    from tests.factories import all_messages, quote_request

    messages = all_messages()
    frames = [codec.encode(m) for m in messages]
    frames += [
        codec.encode(
            envelope.seal(
                CLIENT, dataclasses.replace(m, **{m.SIGNER: CLIENT.peer_id}), now=NOW, ttl_ms=60_000, nonce=bytes(16)
            )
        )
        for m in messages
        if hasattr(m, "SIGNER")
    ]
    inputs = [bytes([mode]) + frame for frame in frames for mode in range(MODES)]
    record = next(m for m in messages if isinstance(m, ReputationRecord))
    receipt = next(m for m in messages if isinstance(m, Receipt))
    # 64-bit encodings of every integer, so that a mutated byte can reach the far end of the range
    wide = dataclasses.replace(receipt, cost=1 << 40, usage=Usage(cpu_ms=1 << 40, wall_ms=1 << 40))
    for r in (receipt, wide):
        inputs.append(bytes([5]) + chunk(codec.encode(record)) + codec.encode(r))
    request = chunk(codec.encode(quote_request(max_price=10**9)))
    floor = bytes([10, 5]) + (250).to_bytes(2, "big") + bytes([1])
    step = (1000).to_bytes(2, "big")
    inputs.append(bytes([6]) + floor + request + bytes([0]) + step + bytes([0]) + bytes([1]) + step)  # quote, accept
    inputs.append(bytes([6]) + floor + request + bytes([0]) + step + bytes([0]) + bytes([2]) + step)
    counter = bytes([3]) + step + (1).to_bytes(6, "big") + bytes([1])
    inputs.append(bytes([6]) + floor + request + bytes([0]) + step + bytes([0]) + counter + bytes([1]) + step)
    for data in inputs:
        (corpus / hashlib.sha1(data).hexdigest()).write_bytes(data)


def dictionary() -> Path:
    """A libFuzzer dictionary: msgpack markers, 64-bit boundary values, and every type and field name."""
    import msgpack

    tokens = [
        b"\xc0",
        b"\xc2",
        b"\xc3",
        b"\xca\x00\x00\x00\x00",
        b"\xcb" + bytes(8),
        b"\xc4\x00",
        b"\xd9\x00",
        b"\xdc\x00\x00",
        b"\xde\x00\x00",
        b"\xc7\x00\x01",
        b"\xd4\x01\x00",
        b"\xce\xff\xff\xff\xff",
    ]
    tokens += [msgpack.packb(n) for n in ((1 << 64) - 1, 1 << 63, (1 << 63) - 1, -(1 << 63), 1 << 40, NOW)]
    for cls in codec.registered_types().values():
        tokens += [msgpack.packb(cls.TYPE)] + [msgpack.packb(f.name) for f in dataclasses.fields(cls)]
    path = SCRATCH / "msgpack.dict"
    path.write_text("".join('"' + "".join(f"\\x{b:02x}" for b in t) + '"\n' for t in dict.fromkeys(tokens)))
    return path


def main() -> None:
    corpus = next((Path(a) for a in sys.argv[1:] if not a.startswith("-")), None)
    if corpus is not None and (not corpus.exists() or corpus.is_dir()):
        corpus.mkdir(parents=True, exist_ok=True)
        if not any(corpus.iterdir()):
            seed(corpus)
    argv = sys.argv
    if not any(a.startswith("-artifact_prefix=") for a in argv):
        argv = [*argv, f"-artifact_prefix={tempfile.gettempdir()}/coop-fuzz-"]
    if not any(a.startswith("-dict=") for a in argv):
        argv = [*argv, f"-dict={dictionary()}"]
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
