import contextlib
import dataclasses

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import codec, envelope, reputation
from protocol.errors import (
    LocalProtocolError,
    MalformedMessage,
    OversizedFrame,
    RemoteProtocolError,
    UnknownMessageType,
    UnknownVersion,
)
from protocol.framing import FrameBuffer, frame
from protocol.messages import CapacityAd, GpuSpec, JobSpec, Quote, QuoteRequest, Runtime
from tests.factories import all_messages, capacity_ad, quote_request


def test_every_registered_type_has_a_round_trip_case():
    covered = {type(m).TYPE for m in all_messages()} | {envelope.Envelope.TYPE}  # see test_envelope.py
    covered |= {
        reputation.RecordBundle.TYPE,
        reputation.SyncRequest.TYPE,
        reputation.SyncResponse.TYPE,
    }  # test_reputation_records.py
    assert covered == set(codec.registered_types())


@pytest.mark.parametrize("message", all_messages(), ids=lambda m: type(m).TYPE)
def test_round_trip(message):
    data = codec.encode(message)
    assert codec.decode(data) == message
    assert codec.decode(data, type(message)) == message
    assert codec.encode(codec.decode(data)) == data  # canonical: re-encoding gives the same bytes


def test_encoding_is_canonical_regardless_of_map_order():
    spec = all_messages()[7]
    assert isinstance(spec, JobSpec)
    a = dataclasses.replace(spec, env={"A": "1", "B": "2"})
    b = dataclasses.replace(spec, env={"B": "2", "A": "1"})
    assert codec.encode(a) == codec.encode(b)


def _frame(body, *, version=codec.WIRE_VERSION, name="quote-request"):
    return msgpack.packb([version, name, body], use_bin_type=True)


def _body(message):
    return codec.to_plain(message)


def test_unknown_version():
    with pytest.raises(UnknownVersion):
        codec.decode(_frame(_body(quote_request()), version=2))


def test_unknown_type_and_unexpected_type():
    with pytest.raises(UnknownMessageType):
        codec.decode(_frame({}, name="launch-missiles"))
    with pytest.raises(UnknownMessageType):
        codec.decode(codec.encode(quote_request()), Quote)


def test_oversized_frames():
    with pytest.raises(OversizedFrame):
        codec.decode(b"\x93" + b"\x00" * (codec.MAX_FRAME_BYTES + 1))
    # under the global cap but over the quote-request cap (4 KiB): refused before the body is parsed
    body = _body(quote_request())
    body["job_id"] = "x" * 10_000
    with pytest.raises(OversizedFrame, match="quote-request"):
        codec.decode(_frame(body))


def test_encoding_over_the_cap_is_our_error():
    ad = capacity_ad()
    big = dataclasses.replace(ad, addrs=tuple("/ip4/127.0.0.1/tcp/" + "1" * 230 for _ in range(16)))
    runtimes = tuple(
        Runtime(name=f"r{i}" + "r" * 29, interpreter="i" * 64, lock_sha256=b"\x01" * 32) for i in range(16)
    )
    big = dataclasses.replace(big, runtimes=runtimes)
    big = dataclasses.replace(big, gpus=(GpuSpec(model="G" * 128, memory_bytes=1),) * 60)
    with pytest.raises(LocalProtocolError):
        codec.encode(big)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_price", True),  # bool is not an int
        ("max_price", "100"),
        ("max_price", 1.5),  # floats are never allowed
        ("max_price", -1),  # range checked by __post_init__
        ("job_id", b"job-1"),  # bytes is not str
        ("job_id", "../etc"),
        ("client", "not-a-peer-id"),
        ("resources", [1, 2]),
        ("deadline", None),
    ],
)
def test_wrong_types_and_values_are_malformed(field, value):
    body = _body(quote_request())
    body[field] = value
    with pytest.raises(MalformedMessage):
        codec.decode(_frame(body))


def test_missing_and_unknown_fields_are_malformed():
    body = _body(quote_request())
    del body["deadline"]
    with pytest.raises(MalformedMessage, match="missing"):
        codec.decode(_frame(body))
    body = _body(quote_request())
    body["extra"] = 1
    with pytest.raises(MalformedMessage, match="unknown"):
        codec.decode(_frame(body))


def test_nested_struct_types_checked():
    body = _body(capacity_ad())
    body["gpus"] = [{"model": "x", "memory_bytes": "lots"}]
    with pytest.raises(MalformedMessage, match="memory_bytes"):
        codec.decode(_frame(body, name=CapacityAd.TYPE))


def test_trailing_bytes_and_extensions_are_malformed():
    data = codec.encode(quote_request())
    with pytest.raises(MalformedMessage):
        codec.decode(data + b"\x00")
    ext = msgpack.packb([1, "quote-request", msgpack.ExtType(1, b"x")], use_bin_type=True)
    with pytest.raises(MalformedMessage):
        codec.decode(ext)


def test_floats_cannot_be_encoded():
    with pytest.raises(LocalProtocolError):
        codec.pack_canonical({"x": 1.0})


VALID_FRAMES = [codec.encode(m) for m in all_messages()]


@given(st.binary(max_size=2048))
def test_fuzz_any_bytes_decode_or_raise_remote_error(data):
    with contextlib.suppress(RemoteProtocolError):
        codec.decode(data)


@given(st.sampled_from(VALID_FRAMES), st.data())
def test_fuzz_mutated_frames_decode_or_raise_remote_error(frame_bytes, data):
    mutated = bytearray(frame_bytes)
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(mutated) - 1))
        mutated[index] = data.draw(st.integers(0, 255))
    with contextlib.suppress(RemoteProtocolError):
        codec.decode(bytes(mutated))


@given(st.sampled_from(VALID_FRAMES), st.data())
def test_fuzz_split_stream_reassembles_or_raises(frame_bytes, data):
    """Frames fed through the stream reassembler in arbitrary splits decode to the same message."""
    stream = frame(frame_bytes, max_bytes=codec.MAX_FRAME_BYTES) * 2
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    buffer = FrameBuffer(max_bytes=codec.MAX_FRAME_BYTES)
    out = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        out += buffer.feed(stream[start:end])
    assert out == [frame_bytes, frame_bytes]
    assert buffer.pending == 0
    assert [codec.decode(f) for f in out] == [codec.decode(frame_bytes)] * 2


@given(st.lists(st.binary(max_size=64), max_size=20))
def test_fuzz_split_garbage_frames_decode_or_raise(chunks):
    buffer = FrameBuffer(max_bytes=1024)
    try:
        for chunk in chunks:
            for f in buffer.feed(chunk):
                with contextlib.suppress(RemoteProtocolError):
                    codec.decode(f)
    except OversizedFrame:
        pass


def test_every_prefix_of_a_frame_is_refused():
    data = codec.encode(quote_request())
    for end in range(len(data)):
        with pytest.raises(RemoteProtocolError):
            codec.decode(data[:end])


def test_frame_buffer_refuses_oversized_announcement_before_body():
    buffer = FrameBuffer(max_bytes=100)
    with pytest.raises(OversizedFrame):
        buffer.feed((101).to_bytes(4, "big"))


def test_decode_accepts_tuple_of_expected_types():
    data = codec.encode(quote_request())
    assert isinstance(codec.decode(data, (Quote, QuoteRequest)), QuoteRequest)
