"""Hypothesis strategies generated from the proto descriptors.

``request_strategy(method)`` walks the method's input message: every scalar type, repeated
fields, maps, oneofs and nested messages get well-typed but hostile values (huge and empty
strings, unicode edge cases, NULs, 64-bit extremes, negative numbers, deep JSON, long repeated
fields). ``raw_case(method)`` mutates the encoding itself and the HTTP/2 request around it:
random bodies, truncated and lying length prefixes, compressed flags, deep unknown groups,
hostile ``grpc-timeout`` and ``-bin`` headers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import (
    Descriptor,
    FieldDescriptor,
    MethodDescriptor,
    OneofDescriptor,
)
from google.protobuf.message import Message
from hypothesis import strategies as st

from tests.fuzz.wire import grpc_frame

INT64 = (-(2**63), 2**63 - 1)
UINT64 = (0, 2**64 - 1)
INT32 = (-(2**31), 2**31 - 1)
UINT32 = (0, 2**32 - 1)

BIG = 300 * 1024  # above the default 256 KiB message limit once framed


def _edge_ints(low: int, high: int) -> st.SearchStrategy[int]:
    edges = {low, high, 0, 1, -1, high - 1, low + 1, 2**31, 2**32, 2**53 + 1, 2**62, -(2**62)}
    edges |= {86400 * 366, 86400 * 366 + 1, 10**12, 10**15}
    return st.one_of(
        st.sampled_from(sorted(e for e in edges if low <= e <= high)),
        st.integers(low, high),
    )


def _deep_json(depth: int) -> str:
    return "[" * depth + "]" * depth


# Strings a careless parser, store or log would trip on. Kept as literals (and a few sizes)
# so that generating them costs nothing.
HOSTILE_TEXT: tuple[str, ...] = (
    "",
    " ",
    "\x00",
    "a\x00b",
    "\x00" * 64,
    "\n",
    "line\nFAKE LOG LINE ERROR Traceback (most recent call last):",
    "\r\n\r\n",
    "\u202e\u2066evil",  # bidi overrides
    "\u200b",
    "\ufeff",
    "e\u0301" * 500,  # combining marks
    "\U0001f600" * 100,
    "\uffff\ufffe",
    "\U0010ffff",
    "%s%n%x%d",
    "{}{0}{name}",
    "' OR '1'='1",
    "../../../../etc/passwd",
    "/proc/self/environ",
    "spiffe://",
    "spiffe://example.org",
    "spiffe://example.org/",
    "spiffe://example.org/a/../b",
    "spiffe://example.org/%00",
    "spiffe://EXAMPLE.org/x",
    "spiffe://example.org/" + "a" * 2100,
    "spiffe://other.org/workload",
    "spiffe://example.org/agent/one",
    "spiffe://example.org/fuzz/other",
    "join_token",
    "x509pop",
    "unix",
    "jwt",
    "uid:0",
    "unix:uid:0",
    "jti",
    "task",
    "subject",
    "entry",
    "attestor",
    "key",
    "read",
    "deploy/production",
    "metrics/prod",
    "agents.cedar",
    "agents.tests.json",
    "policy.rego",
    "{}",
    "[]",
    "null",
    '{"a":1e999999}',
    '{"a":NaN}',
    '{"a":"\\ud800"}',
    "{" * 5000,
    _deep_json(1000),
    '{"a":' * 1000 + "1" + "}" * 1000,
    '{"input": ' + _deep_json(200) + "}",
    "permit(principal, action, resource);",
    "forbid(principal, action, resource) when { " + "(" * 500 + "true" + ")" * 500 + " };",
    "A" * 255,
    "A" * 256,
    "A" * 4096,
    "A" * 65537,
    "A" * BIG,
)

HOSTILE_BYTES: tuple[bytes, ...] = (
    b"",
    b"\x00",
    b"\xff" * 32,
    b"\x30",
    b"\x30\x80",  # indefinite length
    b"\x30\x84\xff\xff\xff\xff",  # a DER length of 4 GiB
    b"\x30\x82\x01\x00" + b"\x00" * 10,
    b"\x30" * 200,  # nested SEQUENCE headers
    b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    b"{}",
    b"A" * 65537,
    b"\x00" * BIG,
)

# Any text protobuf can carry: valid UTF-8, so no lone surrogates.
_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)


def text_values() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(HOSTILE_TEXT), _TEXT)


def bytes_values() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.sampled_from(HOSTILE_BYTES),
        st.binary(max_size=64),
        st.builds(lambda n: b"\x30\x82" + n.to_bytes(2, "big"), st.integers(0, 65535)),
    )


_SCALARS: dict[int, Callable[[], st.SearchStrategy[Any]]] = {
    FieldDescriptor.TYPE_STRING: text_values,
    FieldDescriptor.TYPE_BYTES: bytes_values,
    FieldDescriptor.TYPE_BOOL: st.booleans,
    FieldDescriptor.TYPE_INT64: lambda: _edge_ints(*INT64),
    FieldDescriptor.TYPE_SINT64: lambda: _edge_ints(*INT64),
    FieldDescriptor.TYPE_SFIXED64: lambda: _edge_ints(*INT64),
    FieldDescriptor.TYPE_UINT64: lambda: _edge_ints(*UINT64),
    FieldDescriptor.TYPE_FIXED64: lambda: _edge_ints(*UINT64),
    FieldDescriptor.TYPE_INT32: lambda: _edge_ints(*INT32),
    FieldDescriptor.TYPE_SINT32: lambda: _edge_ints(*INT32),
    FieldDescriptor.TYPE_SFIXED32: lambda: _edge_ints(*INT32),
    FieldDescriptor.TYPE_UINT32: lambda: _edge_ints(*UINT32),
    FieldDescriptor.TYPE_FIXED32: lambda: _edge_ints(*UINT32),
    FieldDescriptor.TYPE_DOUBLE: lambda: st.floats(allow_nan=True, allow_infinity=True),
    FieldDescriptor.TYPE_FLOAT: lambda: st.floats(width=32, allow_nan=True, allow_infinity=True),
}

MAX_DEPTH = 6  # recursive messages (google.protobuf.Struct) stop nesting here


def _is_repeated(fd: FieldDescriptor) -> bool:
    return bool(fd.is_repeated)


def _message_type(fd: FieldDescriptor) -> Descriptor:
    assert fd.message_type is not None, fd.full_name
    return fd.message_type


def _is_map(fd: FieldDescriptor) -> bool:
    return fd.type == FieldDescriptor.TYPE_MESSAGE and bool(
        _message_type(fd).GetOptions().map_entry
    )


def _single(fd: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if fd.type == FieldDescriptor.TYPE_MESSAGE:
        return message_strategy(_message_type(fd), depth + 1)
    if fd.type == FieldDescriptor.TYPE_ENUM:
        assert fd.enum_type is not None
        numbers = [v.number for v in fd.enum_type.values]
        return st.one_of(st.sampled_from(numbers), _edge_ints(*INT32))
    return _SCALARS[fd.type]()


LONG_BYTES = 1 << 20  # a long repeated field or map stays under about 1 MiB


def _size(item: Any) -> int:
    if isinstance(item, Message):
        return item.ByteSize() + 2
    if isinstance(item, str):
        return len(item.encode()) + 2
    if isinstance(item, bytes):
        return len(item) + 2
    return 10


def _copies(item: Any, n: int) -> int:
    return max(1, min(n, LONG_BYTES // _size(item)))


def _long_list(element: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    """Thousands of copies of one element: cheap to generate, large on the wire."""
    return st.builds(
        lambda item, n: [item] * _copies(item, n), element, st.sampled_from((100, 1000, 20_000))
    )


def field_strategy(fd: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if _is_map(fd):
        key_fd = _message_type(fd).fields_by_name["key"]
        value_fd = _message_type(fd).fields_by_name["value"]
        keys, values = _single(key_fd, depth), _single(value_fd, depth)
        strategies = [st.dictionaries(keys, values, max_size=4)]
        if key_fd.type == FieldDescriptor.TYPE_STRING:
            strategies.append(
                st.builds(
                    lambda v, n: {f"k{i}": v for i in range(_copies(v, n))},
                    values,
                    st.sampled_from((100, 5000)),
                )
            )
        return st.one_of(*strategies)
    if _is_repeated(fd):
        element = _single(fd, depth)
        return st.one_of(st.lists(element, max_size=4), _long_list(element))
    return _single(fd, depth)


def _make(descriptor: Descriptor, cls: type[Message], values: dict[str, Any]) -> Message:
    message = cls()
    for name, value in values.items():
        if value is None:
            continue
        fd = descriptor.fields_by_name[name]
        target = getattr(message, name)
        if _is_map(fd):
            for key, item in value.items():
                if isinstance(item, Message):
                    target[key].CopyFrom(item)
                else:
                    target[key] = item
        elif _is_repeated(fd):
            target.extend(value)
        elif fd.type == FieldDescriptor.TYPE_MESSAGE:
            target.CopyFrom(value)
        else:
            setattr(message, name, value)
    return message


def _synthetic(oneof: OneofDescriptor) -> bool:
    """proto3 ``optional``: a oneof of one field, named after it with a leading underscore."""
    return len(oneof.fields) == 1 and oneof.name == f"_{oneof.fields[0].name}"


def _deferred(fd: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    """Built when first drawn: recursive message types need not be walked to the end."""
    return st.deferred(lambda: field_strategy(fd, depth))


@functools.cache
def message_strategy(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Messages of ``descriptor``'s type: each field absent or hostile, at most one member of
    each oneof set."""
    cls = message_factory.GetMessageClass(descriptor)
    if depth >= MAX_DEPTH:
        return st.just(cls())
    plain: dict[str, st.SearchStrategy[Any]] = {}
    oneofs: list[st.SearchStrategy[tuple[str, Any] | None]] = []
    real_oneofs = [o for o in descriptor.oneofs if not _synthetic(o)]
    for oneof in real_oneofs:
        oneofs.append(
            st.one_of(
                st.none(),
                *(st.tuples(st.just(fd.name), _deferred(fd, depth)) for fd in oneof.fields),
            )
        )
    in_oneof = {fd.name for oneof in real_oneofs for fd in oneof.fields}
    for fd in descriptor.fields:
        if fd.name in in_oneof:
            continue
        plain[fd.name] = st.one_of(st.none(), _deferred(fd, depth))

    def build(values: dict[str, Any], chosen: list[tuple[str, Any] | None]) -> Message:
        merged = dict(values)
        for pick in chosen:
            if pick is not None:
                merged[pick[0]] = pick[1]
        return _make(descriptor, cls, merged)

    return st.builds(build, st.fixed_dictionaries(plain), st.tuples(*oneofs).map(list))


def request_strategy(method: MethodDescriptor) -> st.SearchStrategy[list[bytes]]:
    """The serialized request messages of one call: one for a unary request, a few for a
    client stream."""
    single = message_strategy(method.input_type).map(lambda m: m.SerializeToString())
    if method.client_streaming:
        return st.lists(single, min_size=0, max_size=4)
    return single.map(lambda body: [body])


# --- the encoding itself and the request around it --------------------------------------------


@dataclass(frozen=True)
class RawCase:
    """One hostile request: its body (gRPC-framed or not) and extra headers."""

    kind: str
    frames: tuple[bytes, ...]
    headers: tuple[tuple[str, str], ...] = ()
    end_stream: bool = True


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _deep_group(depth: int) -> bytes:
    """Unknown field 15 as nested START_GROUPs: recursion in any parser that descends."""
    return _varint(15 << 3 | 3) * depth + _varint(15 << 3 | 4) * depth


def _deep_length_delimited(depth: int) -> bytes:
    """Field 1 nested as length-delimited bytes inside bytes, ``depth`` deep."""
    body = b""
    for _ in range(depth):
        body = _varint(1 << 3 | 2) + _varint(len(body)) + body
    return body


HOSTILE_HEADERS: tuple[tuple[tuple[str, str], ...], ...] = (
    (("grpc-timeout", "0n"),),
    (("grpc-timeout", "0S"),),
    (("grpc-timeout", "99999999H"),),
    (("grpc-timeout", "-1S"),),
    (("grpc-timeout", "abc"),),
    (("grpc-timeout", "1"),),
    (("x-fuzz-bin", "!!!not base64!!!"),),
    (("x-fuzz-bin", "A"),),
    (("grpc-trace-bin", "////"),),
    (("grpc-encoding", "gzip"),),
    (("grpc-encoding", "br"),),
    (("grpc-encoding", "identity"),),
    (("grpc-accept-encoding", "\x00,gzip,,"),),
    (("content-type", "application/json"),),
    (("content-type", "application/grpc+json"),),
    (("te", "gzip"),),
    (("authority-reason", "FORGED"),),
    (("workload.spiffe.io", "false"),),
    (("x-fuzz", "A" * 8000),),
    (("user-agent", "\x7f\x01"),),
)


@st.composite
def raw_case(draw: st.DrawFn, method: MethodDescriptor) -> RawCase:
    """A request whose encoding or framing is wrong, built around a hostile valid message."""
    body = draw(message_strategy(method.input_type)).SerializeToString()
    kind = draw(
        st.sampled_from(
            (
                "random-body",
                "truncated-message",
                "lying-length",
                "short-prefix",
                "compressed-flag",
                "gzip-garbage",
                "bad-flag",
                "huge-length-claim",
                "trailing-garbage",
                "two-messages",
                "no-message",
                "deep-group",
                "deep-nesting",
                "wrong-wire-type",
                "hostile-header",
                "unframed",
                "half-open",
            )
        )
    )
    garbage = draw(st.binary(min_size=1, max_size=200))
    headers: tuple[tuple[str, str], ...] = ()
    end_stream = True
    match kind:
        case "random-body":
            frames = [grpc_frame(garbage)]
        case "truncated-message":
            cut = draw(st.integers(0, max(len(body) - 1, 0)))
            frames = [grpc_frame(body[:cut] or b"\x0a")]
            if body:
                frames = [grpc_frame(body[:cut] + b"\x0a\xff")]
        case "lying-length":
            frames = [grpc_frame(body, length=len(body) + draw(st.integers(1, 1 << 16)))]
        case "short-prefix":
            frames = [grpc_frame(body)[: draw(st.integers(1, 4))]]
        case "compressed-flag":
            frames = [grpc_frame(body, compressed=1)]
        case "gzip-garbage":
            frames = [grpc_frame(garbage, compressed=1)]
            headers = (("grpc-encoding", "gzip"),)
        case "bad-flag":
            frames = [grpc_frame(body, compressed=draw(st.integers(2, 255)))]
        case "huge-length-claim":
            claim = draw(st.sampled_from((0xFFFFFFFF, 1 << 31, 64 << 20, 4 << 20)))
            frames = [grpc_frame(garbage, length=claim)]
        case "trailing-garbage":
            frames = [grpc_frame(body + garbage)]
        case "two-messages":
            frames = [grpc_frame(body), grpc_frame(body)]
        case "no-message":
            frames = []
        case "deep-group":
            frames = [grpc_frame(_deep_group(draw(st.sampled_from((64, 101, 1000, 10_000)))))]
        case "deep-nesting":
            frames = [grpc_frame(_deep_length_delimited(draw(st.sampled_from((101, 1000)))))]
        case "wrong-wire-type":
            # every field number of the message, each with the wrong wire type
            numbers = [fd.number for fd in method.input_type.fields] or [1]
            wrong = b"".join(_varint(n << 3 | 5) + b"\xff\xff\xff\xff" for n in numbers)
            frames = [grpc_frame(wrong)]
        case "hostile-header":
            headers = draw(st.sampled_from(HOSTILE_HEADERS))
            frames = [grpc_frame(body)]
        case "unframed":
            frames = [body or garbage]
        case _:  # "half-open": the request never ends; the server must still answer or wait
            frames = [grpc_frame(body)[: draw(st.integers(1, 5))]]
            end_stream = False
    return RawCase(kind, tuple(frames), headers, end_stream)
