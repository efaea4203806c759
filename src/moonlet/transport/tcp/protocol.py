"""The moonlet TCP wire format, sans-IO: bytes in, events out.

No socket is touched here.  :class:`FrameReader` is the state machine that
reads frames on both ends (the TCP target's connections, the initiator's
lanes) and the one the tests and the fuzzer feed, so fuzzing it exercises the
exact code that meets untrusted input.

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
AUTH       none                         challenge-response with the cluster secret (security/auth.py)
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


# --- the reader of one connection's frames, sans-IO --------------------------------------------------------

# The states of a FrameReader: what the next bytes of the stream are.
HEAD, TABLE, BODY, PAYLOAD, DETACHED, BROKEN = 0, 1, 2, 3, 4, 5
STATES = {HEAD: "HEAD", TABLE: "TABLE", BODY: "BODY", PAYLOAD: "PAYLOAD", DETACHED: "DETACHED", BROKEN: "BROKEN"}

# What FrameReader.received returns once a part of a frame is in (its data is on the reader's attributes).
NOTHING = 0  # more bytes are needed
SINGLE = 1  # target: a lone WRITE/READ of one entry, whole in the head: ``single`` = (kind, req_id, addr, length)
REQUEST = 2  # target: a request frame's table: ``prefix``, ``entries``
CONTROL = 3  # target: a control frame (HELLO, GET_DESC, CONNECT, AUTH): ``prefix``, ``body``
REPLY = 4  # initiator: a RESP frame's head and statuses: ``req_id``, ``statuses``, ``payload_len``
# (an initiator's reader made with control=True returns CONTROL for the answers to its control frames)
PEER_ERROR = 5  # initiator: an ERROR frame: ``body`` (UTF-8 text); the peer closes after it

_TARGET_CONTROL = frozenset((HELLO, GET_DESC, CONNECT, AUTH))  # control frames a target answers
_ANSWERS = frozenset((HELLO, DESC, CONNECT, AUTH))  # what a target answers them with


class FrameReader:
    """The frames arriving on one connection, for the side that reads them: the state machine both the
    TCP target and the initiator's lanes serve with, and the tests and the fuzzer drive.

    No socket here. The I/O side receives into ``into`` (filling ``into[got:need]``, as much as has
    arrived) and reports the count to :meth:`received`, which returns :data:`NOTHING` until a part of a
    frame is in, then what it was (:data:`SINGLE`, :data:`REQUEST`, :data:`CONTROL`, :data:`REPLY`,
    :data:`PEER_ERROR`), with its data on the reader. A payload goes straight into memory the I/O side
    names (:meth:`expect_payload`: the views of registered memory, consumed as they fill), so nothing is
    copied here. The head is read with the bytes that every frame towards this side has after its prefix
    (``MIN_TARGET_TAIL`` / ``MIN_INITIATOR_TAIL``): one receive call serves a lone request or reply.

    Malformed input raises :class:`ProtocolError` and the reader refuses more (state ``BROKEN``): the
    connection must close. :meth:`feed` is the same machine for bytes held in memory (tests, fuzzing).
    """

    __slots__ = ("state", "initiator", "control", "fast", "head", "into", "got", "need", "prefix", "buf",
                 "single", "entries", "body", "req_id", "statuses", "payload_len", "views", "_left", "_hview",
                 "_hsize")

    def __init__(self, initiator: bool, control: bool = False) -> None:
        """``initiator``: read replies (RESP, ERROR), and with ``control`` the answers to control frames
        (HELLO, DESC, CONNECT, AUTH: a lane refuses those at their prefix, before their body); else
        requests and control frames, as a target."""
        self.initiator = initiator
        self.control = initiator and control
        #: whether a lone request or reply is decoded straight from the head (a target sets it once the peer
        #: has authenticated: until then every frame takes the general path, which explains refusals)
        self.fast = initiator
        self.head = bytearray(PREFIX_SIZE + (MIN_INITIATOR_TAIL if initiator else MIN_TARGET_TAIL))
        self._hview = memoryview(self.head)  # made once: every frame starts here
        self._hsize = len(self.head)
        self.prefix: Prefix | None = None
        self.single: tuple[int, int, int, int] = (0, 0, 0, 0)
        self.entries: list[tuple] = []
        self.body = b""
        self.req_id = 0
        self.statuses = b""
        self.payload_len = 0
        self.views: list[memoryview] = []  # where the PAYLOAD goes, consumed as it fills
        self._left = 0  # payload bytes :meth:`feed` has still to pass on
        self.next()

    def next(self) -> None:
        """Expect the head of the next frame."""
        self.state = HEAD
        self.into = self._hview
        self.got = 0
        self.need = self._hsize
        self.buf: bytearray | None = None

    @property
    def under_way(self) -> bool:
        """Whether part of a frame beyond its head has arrived (a frame that must be finished in time)."""
        return self.state != HEAD and self.state != DETACHED

    def partial_head(self) -> bytes:
        """The first bytes of a head not yet whole (another protocol's client may have sent them)."""
        return bytes(self.head[:self.got]) if self.state == HEAD else b""

    def detach(self) -> None:
        """The connection was handed to another protocol: no more frames."""
        self.state = DETACHED

    def expect_payload(self, views: list[memoryview]) -> None:
        """The frame just announced carries a payload: it goes into ``views`` (consumed as they fill; the
        I/O side calls :meth:`payload_done` once they are empty)."""
        self.state = PAYLOAD
        self.views = views

    def take_single_the_long_way(self) -> None:
        """Turn the :data:`SINGLE` just returned into the :data:`REQUEST` it also is (``prefix``, ``entries``):
        the target's general path explains a refusal or stages GPU memory."""
        kind, req_id, addr, length = self.single
        self.prefix = Prefix(kind, 1, req_id, length if kind == WRITE else 0)
        self.entries = [(addr, length)]

    def payload_done(self) -> None:
        self.views = []
        self.next()

    def received(self, n: int) -> int:
        """``n`` more bytes are in ``into``: what, if anything, is now whole."""
        self.got += n
        if self.got < self.need:
            return NOTHING
        try:
            if self.state == HEAD:
                return self._head()
            return self._rest()
        except ProtocolError:
            self.state = BROKEN
            raise
        except (struct.error, ValueError) as e:  # sizes are checked before unpacking; kept for safety
            self.state = BROKEN
            raise ProtocolError(f"malformed frame: {e}") from None

    def _head(self) -> int:
        head = self.head
        if self.fast:
            if self.initiator:
                one = parse_single_reply(head)
                if one is not None:  # the head was all of it: the next frame starts where it did (no next())
                    self.req_id, status, self.payload_len = one
                    self.statuses = STATUS_BYTES[status]
                    self.got = 0
                    return REPLY
            else:
                single = parse_single(head)
                if single is not None:  # as above
                    self.single = single
                    self.got = 0
                    return SINGLE
        p = self.prefix = parse_prefix(head)
        kind = p.kind
        if self.initiator:
            if kind == RESP:
                size, self.state = p.count, TABLE
            elif kind == ERROR or (self.control and kind in _ANSWERS):
                size, self.state = p.payload_len, BODY
            else:
                raise ProtocolError(f"expected RESP from peer, got {KINDS[kind]}")
        elif kind in REQUESTS:
            size, self.state = p.table_size, TABLE
        elif kind in _TARGET_CONTROL:
            size, self.state = p.payload_len, BODY
        else:
            raise ProtocolError(f"a target does not accept {KINDS[kind]} frames")
        tail = len(head) - PREFIX_SIZE
        if size == tail:  # one entry, one status, or a short body: all here already
            self.buf = head[PREFIX_SIZE:]
            return self._rest()
        buf = self.buf = bytearray(size)
        buf[:tail] = head[PREFIX_SIZE:]
        self.into, self.got, self.need = memoryview(buf), tail, size
        return NOTHING

    def _rest(self) -> int:
        """The table or body of the frame whose prefix is ``self.prefix`` is whole in ``self.buf``."""
        p, buf = self.prefix, self.buf
        assert p is not None and buf is not None
        state = self.state
        self.next()
        if state == TABLE:
            if self.initiator:
                self.req_id, self.statuses, self.payload_len = p.req_id, parse_statuses(p, buf), p.payload_len
                return REPLY
            self.entries = parse_entries(p, buf)
            return REQUEST
        self.body = bytes(buf)
        return PEER_ERROR if p.kind == ERROR else CONTROL

    # -- the same machine over bytes in memory ------------------------------------------------------------

    def feed(self, data: bytes) -> list[Event]:
        """Bytes in, events out: every frame whole in ``data`` so far as a :class:`Frame`, payload bytes as
        :class:`Payload` pieces (copied: for tests, fuzzing and tools, not the data path)."""
        if self.state == BROKEN:
            raise ProtocolError("reader already failed; the connection must be closed")
        out: list[Event] = []
        view = memoryview(data)
        pos, end = 0, len(view)
        while pos < end:
            if self.state == PAYLOAD:
                take = min(self._left, end - pos)
                out.append(Payload(bytes(view[pos:pos + take])))
                pos += take
                self._left -= take
                if not self._left:
                    self.payload_done()
                continue
            take = min(self.need - self.got, end - pos)
            self.into[self.got:self.got + take] = view[pos:pos + take]
            pos += take
            what = self.received(take)
            if what == NOTHING:
                continue
            frame = self._event(what)
            out.append(frame)
            if frame.payload_len and frame.kind in (WRITE, RESP):
                self._left = frame.payload_len
                self.state = PAYLOAD
        return out

    def _event(self, what: int) -> Frame:
        if what == SINGLE:
            kind, req_id, addr, length = self.single
            return Frame(kind, req_id, entries=[(addr, length)], payload_len=length if kind == WRITE else 0)
        if what == REPLY:
            return Frame(RESP, self.req_id, statuses=self.statuses, payload_len=self.payload_len)
        p = self.prefix
        assert p is not None
        if what == REQUEST:
            return Frame(p.kind, p.req_id, entries=self.entries, payload_len=p.payload_len)
        return Frame(p.kind, p.req_id, payload_len=p.payload_len, body=self.body)


@dataclass
class Frame:
    """A whole frame header, as :meth:`FrameReader.feed` reports it: prefix, decoded table, and for
    control frames the body."""

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
