"""The moonlet TCP wire format, sans-IO: bytes in, events out.

No socket is touched here.  The transport's hot path calls the same
``parse_prefix`` / ``parse_entries`` / ``parse_statuses`` functions that
:class:`FrameParser` uses, so fuzzing the parser exercises the exact checks
the server runs on untrusted input.

Every frame starts with a fixed 24-byte prefix (little-endian)::

    magic u16 | version u8 | kind u8 | count u32 | req_id u64 | payload_len u64

followed by a kind-specific table, then ``payload_len`` payload bytes:

=========  ===========================  ==============================================
kind       table                        payload
=========  ===========================  ==============================================
HELLO      none                         JSON: {"name": expected segment name or ""}, >= 16 bytes
GET_DESC   none                         16 zero bytes
DESC       none                         JSON segment descriptor
WRITE      count x (addr u64, len u64)  the bytes of every entry, back to back
READ       count x (addr u64, len u64)  none
PULL       count x (addr, len, src u64) none; same host: the target copies from the initiator's src
PUSH       count x (addr, len, dst u64) none; same host: the target copies into the initiator's dst
RESP       count x status u8            for a READ: the bytes of every OK entry
ERROR      none                         UTF-8 message; the sender then closes
CONNECT    none                         JSON: {"service": ..., ...}, >= 16 bytes; answered by CONNECT
AUTH       none                         challenge-response with the cluster secret (see auth.py)
=========  ===========================  ==============================================

A WRITE or READ frame carries up to ``MAX_ENTRIES`` requests, so a batch of
small requests bound for one peer costs one frame and one response.

Every frame a target receives has at least ``MIN_TARGET_TAIL`` bytes after its
prefix, and every frame an initiator receives at least one, so each side may
read that much with the prefix in one system call without ever reading into
the next frame.

CONNECT sets up a side channel for another transport (RDMA queue pairs): the
service named in the body answers with its half of the handshake, and the
connection stays open for as long as the side channel lives.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import NamedTuple

from ... import boundedjson
from ...errors import ProtocolError
from ...memory import Denied

MAGIC = 0x4D4C  # "ML"
MAGIC_BYTES = struct.pack("<H", MAGIC)  # how every moonlet frame starts on the wire
VERSION = 1

HELLO, GET_DESC, DESC, WRITE, READ, RESP, ERROR, PULL, PUSH, CONNECT, AUTH = 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11
KINDS = {HELLO: "HELLO", GET_DESC: "GET_DESC", DESC: "DESC", WRITE: "WRITE", READ: "READ", RESP: "RESP",
         ERROR: "ERROR", PULL: "PULL", PUSH: "PUSH", CONNECT: "CONNECT", AUTH: "AUTH"}
REQUESTS = (WRITE, READ, PULL, PUSH)  # kinds that carry an entry table

PREFIX = struct.Struct("<HBBIQQ")
PREFIX_SIZE = PREFIX.size  # 24
ENTRY_SIZE = 16
ATTACH_ENTRY_SIZE = 24  # PULL / PUSH entries also carry the initiator's address

MAX_ENTRIES = 4096
MAX_CONTROL_BODY = 64 * 1024  # HELLO / ERROR
MAX_DESC_BODY = 64 * 1024 * 1024  # a descriptor with very many buffers
MAX_PAYLOAD = 1 << 48
MAX_JSON_DEPTH = 32  # arrays and objects in a peer's JSON body (HELLO, CONNECT) nest no deeper
MAX_STATUS = max(Denied.REASONS)
MIN_TARGET_TAIL = ENTRY_SIZE  # bytes after the prefix of HELLO / GET_DESC / WRITE / READ frames
MIN_INITIATOR_TAIL = 1  # bytes after the prefix of HELLO / DESC / RESP / ERROR frames


class Prefix(NamedTuple):
    """The fixed part of a frame (a tuple: it is built once per frame on the hot path)."""

    kind: int
    count: int  # type: ignore[assignment]  # the wire format's name for it; shadows tuple.count, unused here
    req_id: int
    payload_len: int

    @property
    def table_size(self) -> int:
        """Bytes of the table that follows the prefix."""
        return self.count * _ROW_SIZE.get(self.kind, 0)


# Bytes per table entry, by kind (kinds absent here have no table).
_ROW_SIZE = {WRITE: ENTRY_SIZE, READ: ENTRY_SIZE, PULL: ATTACH_ENTRY_SIZE, PUSH: ATTACH_ENTRY_SIZE, RESP: 1}
# Per kind: whether count is its number of entries (1..MAX_ENTRIES; else it must be 0), and the
# bounds on payload_len.
_BOUNDS = {kind: (kind in _ROW_SIZE,
                  {HELLO: MIN_TARGET_TAIL, GET_DESC: MIN_TARGET_TAIL, CONNECT: MIN_TARGET_TAIL,
                   AUTH: MIN_TARGET_TAIL, ERROR: 1, DESC: 1}.get(kind, 0),
                  {HELLO: MAX_CONTROL_BODY, ERROR: MAX_CONTROL_BODY, CONNECT: MAX_CONTROL_BODY, AUTH: 64,
                   DESC: MAX_DESC_BODY, GET_DESC: MIN_TARGET_TAIL, READ: 0, PULL: 0, PUSH: 0}.get(kind, MAX_PAYLOAD))
           for kind in KINDS}


def parse_prefix(data: bytes | bytearray | memoryview) -> Prefix:
    """Decode and validate the 24-byte prefix at the start of ``data``."""
    magic, version, kind, count, req_id, payload_len = PREFIX.unpack_from(data)
    if magic == MAGIC and version == VERSION and kind in _BOUNDS:
        counted, floor, cap = _BOUNDS[kind]
        if (1 <= count <= MAX_ENTRIES if counted else not count) and floor <= payload_len <= cap:
            return Prefix(kind, count, req_id, payload_len)
    raise _prefix_error(magic, version, kind, count, payload_len)


def _prefix_error(magic: int, version: int, kind: int, count: int, payload_len: int) -> ProtocolError:
    """What is wrong with a prefix that :func:`parse_prefix` refused."""
    if magic != MAGIC:
        return ProtocolError(f"bad magic {magic:#06x}, expected {MAGIC:#06x}: not a moonlet peer")
    if version != VERSION:
        return ProtocolError(f"unsupported protocol version {version}, this side speaks {VERSION}")
    if kind not in KINDS:
        return ProtocolError(f"unknown frame kind {kind}")
    counted, floor, cap = _BOUNDS[kind]
    if counted and not 1 <= count <= MAX_ENTRIES:
        return ProtocolError(f"{KINDS[kind]} frame with {count} entries; allowed 1..{MAX_ENTRIES}")
    if not counted and count:
        return ProtocolError(f"{KINDS[kind]} frame must have count 0, got {count}")
    if payload_len > cap:
        return ProtocolError(f"{KINDS[kind]} frame announces {payload_len} payload bytes; at most {cap}")
    return ProtocolError(f"{KINDS[kind]} frame announces {payload_len} payload bytes; at least {floor}")


_SINGLE = struct.Struct("<HBBIQQQQ")  # a prefix and one (addr, length) entry: MIN_TARGET_TAIL after it


def parse_single(data: bytes | bytearray | memoryview) -> tuple[int, int, int, int] | None:
    """``(kind, req_id, addr, length)`` if the first 40 bytes of ``data`` are a whole one-entry WRITE or
    READ frame head that :func:`parse_prefix` and :func:`parse_entries` would accept; None for anything
    else (those decide, and explain a refusal).

    A target reads that much with every prefix, and a lone small request is the latency-bound case:
    this is its one-call path. The tests check it agrees with the two general functions.
    """
    magic, version, kind, count, req_id, payload_len, addr, length = _SINGLE.unpack_from(data)
    if magic == MAGIC and version == VERSION and count == 1 and length and (
            payload_len == length <= MAX_PAYLOAD if kind == WRITE else kind == READ and not payload_len):
        return kind, req_id, addr, length
    return None


_SINGLE_REPLY = struct.Struct("<HBBIQQB")  # a prefix and one status byte: MIN_INITIATOR_TAIL after it
STATUS_BYTES = [bytes((code,)) for code in range(256)]  # one-status tables, made once


def parse_single_reply(data: bytes | bytearray | memoryview) -> tuple[int, int, int] | None:
    """``(req_id, status, payload_len)`` if the first 25 bytes of ``data`` are the head of a one-entry
    RESP frame that :func:`parse_prefix` and :func:`parse_statuses` would accept; None for anything
    else (those decide, and explain a refusal).

    An initiator reads that much with every prefix: this is the reply to a lone request in one call.
    The tests check it agrees with the two general functions.
    """
    magic, version, kind, count, req_id, payload_len, status = _SINGLE_REPLY.unpack_from(data)
    if magic == MAGIC and version == VERSION and kind == RESP and count == 1 and status <= MAX_STATUS \
            and payload_len <= MAX_PAYLOAD:
        return req_id, status, payload_len
    return None


def parse_entries(prefix: Prefix, table: bytes | bytearray | memoryview) -> list[tuple]:
    """Decode the table of a WRITE/READ frame ((addr, length) pairs) or of a PULL/PUSH frame
    ((addr, length, initiator addr) triples) and check it against the prefix."""
    kind = prefix.kind
    entries = list(struct.iter_unpack("<QQ" if kind == WRITE or kind == READ else "<QQQ", table))
    lengths = [e[1] for e in entries]
    if kind == WRITE and sum(lengths) != prefix.payload_len:
        raise ProtocolError(f"WRITE entries add up to {sum(lengths)} bytes but the frame carries "
                            f"{prefix.payload_len}")
    if entries and min(lengths) == 0:
        raise ProtocolError("entry of length 0")
    return entries


def parse_statuses(prefix: Prefix, table: bytes | bytearray | memoryview) -> bytes:
    """Decode the status table of a RESP frame (one :class:`~moonlet.memory.Denied` code per entry)."""
    statuses = bytes(table)
    if max(statuses) > MAX_STATUS:
        raise ProtocolError(f"unknown status code {max(statuses)} in RESP frame")
    return statuses


def encode_prefix(kind: int, count: int, req_id: int, payload_len: int) -> bytes:
    return PREFIX.pack(MAGIC, VERSION, kind, count, req_id, payload_len)


def encode_request(kind: int, req_id: int, entries: list[tuple[int, int]]) -> bytes:
    """Prefix + table of a WRITE or READ frame (the WRITE payload is sent after it)."""
    return encode_request_flat(kind, req_id, [x for e in entries for x in e])


def encode_request_flat(kind: int, req_id: int, table: list[int], payload_len: int | None = None) -> bytes:
    """:func:`encode_request` from a flat table, ``[addr, len, ...]`` (or ``[addr, len, src, ...]`` for
    PULL/PUSH): the hot path's form."""
    width = 2 if kind == WRITE or kind == READ else 3
    if payload_len is None:
        payload_len = sum(table[1::2]) if kind == WRITE else 0
    words = len(table)
    layout = _REQUEST_LAYOUTS.get(words)
    if layout is None:
        layout = _REQUEST_LAYOUTS[words] = struct.Struct(f"<HBBIQQ{words}Q")
    return layout.pack(MAGIC, VERSION, kind, words // width, req_id, payload_len, *table)


_REQUEST_LAYOUTS: dict[int, struct.Struct] = {}  # prefix + table of N words, by N


def encode_response(req_id: int, statuses: bytes, payload_len: int) -> bytes:
    """Prefix + status table of a RESP frame (READ data follows it)."""
    return PREFIX.pack(MAGIC, VERSION, RESP, len(statuses), req_id, payload_len) + statuses


def encode_control(kind: int, body: bytes = b"", req_id: int = 0) -> bytes:
    """A whole HELLO / GET_DESC / DESC / ERROR frame."""
    return PREFIX.pack(MAGIC, VERSION, kind, 0, req_id, len(body)) + body


def encode_hello(name: str, **identity: object) -> bytes:
    """HELLO naming the segment expected; ``identity`` (pid, host, pidns) asks for same-host copies."""
    return encode_control(HELLO, json.dumps({"name": name, **identity}).encode().ljust(MIN_TARGET_TAIL))


def encode_connect(body: dict) -> bytes:
    """CONNECT (either direction): a JSON object, padded so a target may read 16 bytes with the prefix."""
    return encode_control(CONNECT, json.dumps(body).encode().ljust(MIN_TARGET_TAIL))


def decode_connect(body: bytes) -> dict:
    """The CONNECT body as a dict with a string ``service``."""
    try:
        d = loads_bounded(body)
        if not isinstance(d, dict) or not isinstance(d.get("service", ""), str):
            raise TypeError("CONNECT body must be an object with a string service")
        return d
    except (ValueError, TypeError) as e:
        raise ProtocolError(f"malformed CONNECT body: {e!r}") from None


def loads_bounded(body: bytes | str) -> object:
    """A control frame's JSON body, bounded in nesting (:mod:`moonlet.boundedjson`); ValueError if refused."""
    return boundedjson.loads(body, MAX_DESC_BODY, MAX_JSON_DEPTH)


def encode_get_desc() -> bytes:
    return encode_control(GET_DESC, bytes(MIN_TARGET_TAIL))


def encode_error(message: str) -> bytes:
    return encode_control(ERROR, (message or "error").encode()[:MAX_CONTROL_BODY])


def decode_hello(body: bytes) -> dict:
    """The HELLO body as a dict with at least a string ``name``."""
    try:
        d = loads_bounded(body)
        if not isinstance(d, dict) or not isinstance(d["name"], str):
            raise TypeError("HELLO body must be an object with a string name")
        if "pid" in d and not isinstance(d["pid"], int):
            raise TypeError("pid is not an integer")
        return d
    except (ValueError, TypeError, KeyError) as e:
        raise ProtocolError(f"malformed HELLO body: {e!r}") from None


# --- incremental parser (used by tests, fuzzing and control paths) -------------


@dataclass
class Frame:
    """A whole frame header: prefix, decoded table, and for control frames the body."""

    kind: int
    req_id: int
    entries: list[tuple[int, int]] = field(default_factory=list)
    statuses: bytes = b""
    payload_len: int = 0
    body: bytes | None = None


@dataclass
class Payload:
    """A piece of a WRITE or RESP frame's payload."""

    data: bytes


Event = Frame | Payload


class FrameParser:
    """Feed bytes with :meth:`feed`, take :class:`Frame` / :class:`Payload` events from :meth:`events`.

    Any malformed input raises :class:`ProtocolError`; after that the parser
    refuses further input, as the connection must be closed.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._prefix: Prefix | None = None
        self._payload_left = 0
        self._broken = False

    def feed(self, data: bytes) -> None:
        if self._broken:
            raise ProtocolError("parser already failed; the connection must be closed")
        self._buf += data

    def events(self) -> list[Event]:
        out: list[Event] = []
        try:
            while True:
                ev = self._next()
                if ev is None:
                    return out
                out.append(ev)
        except ProtocolError:
            self._broken = True
            raise
        except struct.error as e:  # pragma: no cover - sizes are checked before unpacking
            self._broken = True
            raise ProtocolError(str(e)) from None

    def _next(self) -> Event | None:
        if self._payload_left:
            if not self._buf:
                return None
            n = min(self._payload_left, len(self._buf))
            chunk = bytes(self._buf[:n])
            del self._buf[:n]
            self._payload_left -= n
            return Payload(chunk)
        if self._prefix is None:
            if len(self._buf) < PREFIX_SIZE:
                return None
            self._prefix = parse_prefix(self._buf[:PREFIX_SIZE])
            del self._buf[:PREFIX_SIZE]
        p = self._prefix
        if p.kind in REQUESTS or p.kind == RESP:
            need = p.table_size
            if len(self._buf) < need:
                return None
            table = bytes(self._buf[:need])
            del self._buf[:need]
            self._prefix = None
            self._payload_left = p.payload_len
            if p.kind == RESP:
                return Frame(p.kind, p.req_id, statuses=parse_statuses(p, table), payload_len=p.payload_len)
            return Frame(p.kind, p.req_id, entries=parse_entries(p, table), payload_len=p.payload_len)
        if len(self._buf) < p.payload_len:
            return None
        body = bytes(self._buf[: p.payload_len])
        del self._buf[: p.payload_len]
        self._prefix = None
        return Frame(p.kind, p.req_id, payload_len=p.payload_len, body=body)
