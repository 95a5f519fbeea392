"""Canonical msgpack codec with per-type size caps and strict, schema-driven decoding.

Theory of operation
-------------------
A frame is the msgpack array ``[version, type, body]``. ``body`` is a map whose keys are the message's field
names, written in sorted order, so the same message always encodes to the same bytes (signatures and hashes
depend on that). Only ``None``, ``bool``, ``int``, ``str``, ``bytes``, arrays and string-keyed maps are allowed:
no floats (their encodings are not canonical across implementations) and no extension types.

Decoding reads the version and type first and checks the frame length against that type's cap *before* the
body is parsed, so a peer cannot make us parse a large body of a small message type. The body is then checked
field by field against the dataclass's annotations (``bool`` is not an ``int``, ``bytes`` is not a ``str``,
unknown and missing fields are refused), and the dataclass's ``__post_init__`` checks value ranges.

Every failure on decode is a :class:`~protocol.errors.RemoteProtocolError` subclass; nothing else escapes.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, Final, Protocol, TypeVar, cast

import msgpack

from protocol.errors import (
    LocalProtocolError,
    MalformedMessage,
    OversizedFrame,
    UnknownMessageType,
    UnknownVersion,
)

WIRE_VERSION: Final = 1
# Largest frame of any type; every frame is refused above this before anything is parsed.
MAX_FRAME_BYTES: Final = 4 << 20  # 4 MiB
MAX_DEPTH: Final = 8


class WireMessage(Protocol):
    """What a registered message class looks like (a frozen dataclass with these class attributes)."""

    TYPE: ClassVar[str]
    MAX_BYTES: ClassVar[int]


M = TypeVar("M")
_REGISTRY: dict[str, type[Any]] = {}


def register(cls: type[M]) -> type[M]:
    """Class decorator: make a dataclass with ``TYPE`` and ``MAX_BYTES`` decodable as a top-level frame."""
    name = cls.TYPE  # type: ignore[attr-defined]
    cap = cls.MAX_BYTES  # type: ignore[attr-defined]
    if name in _REGISTRY:
        raise LocalProtocolError(f"message type {name!r} registered twice")
    if not 0 < cap <= MAX_FRAME_BYTES:
        raise LocalProtocolError(f"{name}: MAX_BYTES must be in (0, {MAX_FRAME_BYTES}]")
    _REGISTRY[name] = cls
    return cls


def registered_types() -> dict[str, type[Any]]:
    return dict(_REGISTRY)


# --------------------------------------------------------------------------------------------------------------
# canonical plain values


def _canonical(value: object, depth: int = 0) -> object:
    if depth > MAX_DEPTH:
        raise LocalProtocolError("value nested too deeply")
    if value is None or isinstance(value, bool | int | str | bytes):
        return value
    if isinstance(value, list | tuple):
        return [_canonical(v, depth + 1) for v in value]
    if isinstance(value, Mapping):
        for k in value:
            if not isinstance(k, str):
                raise LocalProtocolError(f"map keys must be str, got {type(k).__name__}")
        return {k: _canonical(value[k], depth + 1) for k in sorted(value)}
    raise LocalProtocolError(f"type {type(value).__name__} cannot be encoded canonically")


def pack_canonical(value: object) -> bytes:
    """Encode plain data (no dataclasses) canonically: sorted map keys, no floats."""
    return cast(bytes, msgpack.packb(_canonical(value), use_bin_type=True))


def _refuse_ext(code: int, data: bytes) -> object:
    raise MalformedMessage(f"msgpack extension type {code} is not allowed")


def unpack_strict(data: bytes, *, max_bytes: int) -> object:
    """Decode one msgpack value of at most ``max_bytes`` bytes, refusing trailing bytes and extensions."""
    if len(data) > max_bytes:
        raise OversizedFrame(f"{len(data)} bytes exceeds the cap of {max_bytes}")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_refuse_ext,
        )
    except MalformedMessage:
        raise
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise MalformedMessage(f"not a valid msgpack value: {exc}") from exc
    except RecursionError as exc:  # pragma: no cover - msgpack's own stack limit fires first
        raise MalformedMessage("value nested too deeply") from exc


# --------------------------------------------------------------------------------------------------------------
# dataclass <-> plain


def to_plain(obj: object) -> object:
    """Turn a message dataclass (and what it holds) into plain data for :func:`pack_canonical`."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        # A field marked ``omit_default`` (added after a message's first version) is left out while it holds
        # its default: such a message encodes exactly as it did before the field existed.
        return {
            f.name: to_plain(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if not (f.metadata.get("omit_default") and getattr(obj, f.name) == f.default)
        }
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, tuple | list):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


_HINTS: dict[type[Any], dict[str, Any]] = {}


def _hints(cls: type[Any]) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = typing.get_type_hints(cls)
        _HINTS[cls] = hints
    return hints


def _type_name(tp: object) -> str:
    return getattr(tp, "__name__", None) or str(tp)


def _convert(tp: Any, value: object, where: str, depth: int) -> object:
    if depth > MAX_DEPTH:
        raise MalformedMessage(f"{where}: nested too deeply")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, where, depth)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list):
            raise MalformedMessage(f"{where}: expected an array, got {type(value).__name__}")
        return tuple(_convert(args[0], v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value))
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise MalformedMessage(f"{where}: expected a map, got {type(value).__name__}")
        return {
            _convert(key_tp, k, f"{where} key", depth + 1): _convert(val_tp, v, f"{where}[{k!r}]", depth + 1)
            for k, v in value.items()
        }
    if tp is bool:
        if type(value) is not bool:
            raise MalformedMessage(f"{where}: expected bool, got {type(value).__name__}")
        return value
    if tp is int:
        if type(value) is not int:
            raise MalformedMessage(f"{where}: expected int, got {type(value).__name__}")
        return value
    if tp is str or tp is bytes:
        if type(value) is not tp:
            raise MalformedMessage(f"{where}: expected {tp.__name__}, got {type(value).__name__}")
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError as exc:
            raise MalformedMessage(f"{where}: {value!r} is not a valid {tp.__name__}") from exc
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _from_plain(tp, value, where, depth + 1)
    raise LocalProtocolError(f"{where}: unsupported field type {_type_name(tp)}")  # pragma: no cover


def _from_plain(cls: type[M], value: object, where: str, depth: int) -> M:
    if not isinstance(value, dict):
        raise MalformedMessage(f"{where}: expected a map for {cls.__name__}, got {type(value).__name__}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(value) - set(fields)
    if unknown:
        raise MalformedMessage(f"{where}: unknown fields {sorted(map(repr, unknown))[:8]} for {cls.__name__}")
    kwargs: dict[str, object] = {}
    for name, field in fields.items():
        if name not in value:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise MalformedMessage(f"{where}: missing field {name!r} of {cls.__name__}")
            continue
        kwargs[name] = _convert(hints[name], value[name], f"{where}.{name}", depth)
        if field.metadata.get("omit_default") and kwargs[name] == field.default:
            # Only one encoding per message: an omittable field at its default is left out, never written.
            raise MalformedMessage(f"{where}: field {name!r} at its default must be omitted")
    try:
        return cls(**kwargs)
    except LocalProtocolError as exc:
        # __post_init__ range checks: the peer sent values we would never build ourselves.
        raise MalformedMessage(f"{where}: {exc}") from exc


def from_plain(cls: type[M], value: object) -> M:
    """Build message ``cls`` from decoded plain data, checking every field's type strictly."""
    return _from_plain(cls, value, cls.__name__, 0)


# --------------------------------------------------------------------------------------------------------------
# frames


def encode(msg: object) -> bytes:
    """Encode a registered message as a canonical ``[version, type, body]`` frame.

    Raises:
        LocalProtocolError: the message type is unregistered, or the frame exceeds its type's cap.
    """
    cls = type(msg)
    name = getattr(cls, "TYPE", None)
    if name is None or _REGISTRY.get(name) is not cls:
        raise LocalProtocolError(f"{cls.__name__} is not a registered message type")
    data = pack_canonical([WIRE_VERSION, name, to_plain(msg)])
    if len(data) > cls.MAX_BYTES:
        raise LocalProtocolError(f"{name} frame of {len(data)} bytes exceeds its cap of {cls.MAX_BYTES}")
    return data


def _read_header(data: bytes) -> tuple[int, str]:
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, ext_hook=_refuse_ext, max_buffer_size=len(data))
    unpacker.feed(data)
    try:
        n = unpacker.read_array_header()
        if n != 3:
            raise MalformedMessage(f"a frame is a 3-element array, got {n} elements")
        version = unpacker.unpack()
        name = unpacker.unpack()
    except MalformedMessage:
        raise
    except (ValueError, TypeError, msgpack.OutOfData, msgpack.FormatError, msgpack.StackError) as exc:
        raise MalformedMessage(f"bad frame header: {exc}") from exc
    if type(version) is not int:
        raise MalformedMessage("frame version must be an int")
    if type(name) is not str:
        raise MalformedMessage("frame type must be a str")
    return version, name


def decode(data: bytes, expected: type[M] | tuple[type[Any], ...] | None = None) -> M:
    """Decode one frame.

    Args:
        data: the frame bytes, exactly one frame.
        expected: the message class (or classes) acceptable here; ``None`` accepts any registered type.

    Raises:
        OversizedFrame: over the global cap, or over the cap of the type the frame names.
        UnknownVersion: a wire version we do not speak.
        UnknownMessageType: an unregistered type, or not one of ``expected``.
        MalformedMessage: anything else wrong with the bytes or the fields.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedMessage("frame must be bytes")
    data = bytes(data)
    if len(data) > MAX_FRAME_BYTES:
        raise OversizedFrame(f"frame of {len(data)} bytes exceeds the global cap of {MAX_FRAME_BYTES}")
    version, name = _read_header(data)
    if version != WIRE_VERSION:
        raise UnknownVersion(f"wire version {version} is not supported (this node speaks {WIRE_VERSION})")
    cls = _REGISTRY.get(name)
    if cls is None:
        raise UnknownMessageType(f"unknown message type {name[:40]!r}")
    if expected is not None:
        allowed = expected if isinstance(expected, tuple) else (expected,)
        if cls not in allowed:
            names = ", ".join(getattr(c, "TYPE", c.__name__) for c in allowed)
            raise UnknownMessageType(f"got {name}, expected {names}")
    if len(data) > cls.MAX_BYTES:
        raise OversizedFrame(f"{name} frame of {len(data)} bytes exceeds its cap of {cls.MAX_BYTES}")
    plain = unpack_strict(data, max_bytes=cls.MAX_BYTES)
    assert isinstance(plain, list)  # the header check guarantees a 3-array
    return cast(M, from_plain(cls, plain[2]))
