"""Mooncake Transfer Engine's wire formats, sans-IO: bytes in, values out.

Three formats, as Mooncake's public source and a running Mooncake engine
(``mooncake-transfer-engine`` 0.3.13) define them; ``docs/mooncake-compat.md``
describes them in full:

* **Handshake message** (on the engine's RPC port, one exchange per
  connection): ``length u64 LE | type u8 | JSON``, where ``length`` counts the
  type byte and the JSON.  Type 0 sets up RDMA endpoints, 1 asks for the
  segment descriptor (both sides send theirs), 2 delivers a notification.
  The answer has the same shape and type; the server then half-closes.
* **Segment descriptor** (JSON): ``name``, ``protocol``, ``tcp_data_host``,
  ``tcp_data_port``, ``tcp_proto_version`` and ``buffers`` (``name``,
  ``addr``, ``length``), among others.
* **TCP data request** (on ``tcp_data_port``, persistent connections, one
  request at a time): a 24-byte header ``size u64 | addr u64 | opcode u8 |
  7 pad``; opcode 0 READ, 1 WRITE, high bit set for protocol v2.  A v2 WRITE
  sends the payload and then waits for an 8-byte status frame; a v2 READ gets
  the status frame, then the payload.  Version 1 has no status frames.

Every message comes from a peer that may be hostile: JSON is parsed bounded
in size and nesting (:func:`parse_json`), and descriptors are checked field
by field, so bad bytes raise :class:`ProtocolError` and nothing else.
"""

from __future__ import annotations

import json
import re
import struct
import time
from typing import Any

from ... import boundedjson
from ...errors import ProtocolError

CONNECTION, METADATA, NOTIFY, PROBE = 0, 1, 2, 3
OLD_PROTOCOL = 0xFF  # no type byte on the wire; treated like CONNECTION
HANDSHAKE_TYPES = {CONNECTION: "connection", METADATA: "metadata", NOTIFY: "notify", PROBE: "probe"}
#: Longest handshake message: Mooncake refuses longer ones itself.  The largest real message is a
#: segment descriptor (type 1), a few hundred bytes per registered buffer (its per-NIC key lists
#: included), so 1 MiB carries a few thousand buffers.
MAX_HANDSHAKE = 1 << 20
#: Characters of name + message of one notification (what the engine accepts, ``engine._NOTE_MAX``).
NOTE_MAX = 32 * 1024
#: Longest notification message: NOTE_MAX characters, each escaped as ``\uXXXX`` (6 bytes, the most a JSON
#: writer spends on one, short of characters beyond the BMP: 12 bytes, so half as many), plus the keys.
MAX_NOTIFY = 6 * NOTE_MAX + 1024
#: A segment descriptor read from a metadata store (no handshake limit applies there).
MAX_STORED = 16 << 20
#: Nesting of JSON accepted; Mooncake's deepest (a descriptor's buffers' key lists, its priority matrix)
#: is 4 levels, a moonlet descriptor embedded in one 5.
MAX_DEPTH = 32

LENGTH = struct.Struct("<Q")
HEADER = struct.Struct("<QQB7x")  # size, addr, opcode
HEADER_SIZE = HEADER.size  # 24
READ, WRITE = 0, 1
V2_FLAG = 0x80
STATUS = struct.Struct("<Q")
STATUS_MAGIC = 0x4D435456 << 32  # "MCTV" in the high half
STATUS_OK = STATUS_MAGIC | 0
STATUS_REJECTED = STATUS_MAGIC | 1

#: Key under which a moonlet engine embeds its own descriptor in the Mooncake one, so moonlet
#: peers that speak Mooncake's handshake still learn every moonlet transport of the engine.
NATIVE_KEY = "moonlet"


# -- handshake -----------------------------------------------------------------------

def encode_handshake(kind: int, body: dict) -> bytes:
    """One handshake message carrying ``body`` (Mooncake ends its JSON with a newline)."""
    text = (json.dumps(body, separators=(",", ":")) + "\n").encode()
    if kind == OLD_PROTOCOL:  # no type byte
        return LENGTH.pack(len(text)) + text
    return LENGTH.pack(len(text) + 1) + bytes([kind]) + text


def looks_like_handshake(head: bytes) -> bool:
    """Whether the first bytes of a connection (at least 10) are a Mooncake handshake message."""
    if len(head) < 10:
        return False
    (length,) = LENGTH.unpack_from(head)
    if not 2 <= length <= MAX_HANDSHAKE:
        return False
    return head[8] in HANDSHAKE_TYPES and head[9:10] == b"{" or head[8:9] == b"{"


class HandshakeReader:
    """Collects one handshake message from bytes as they arrive.

    The length is checked against what the message's type may carry
    (:data:`MAX_NOTIFY` for a notification, :data:`MAX_HANDSHAKE` for the
    others) as soon as the first 9 bytes are in, before the body is buffered;
    :attr:`need` says how much to read next, so a reader never takes bytes
    past the message.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._total = 0  # bytes of the whole message, once its length and type are in

    @property
    def need(self) -> int:
        """Bytes still missing: up to the length and type first, then the rest of the message."""
        return (self._total or 9) - len(self._buf)

    def feed(self, data: bytes) -> tuple[int, dict] | None:
        """Add ``data``; return ``(type, body)`` once the message is complete, else None."""
        self._buf += data
        if len(self._buf) < 9:
            return None
        if not self._total:
            (length,) = LENGTH.unpack_from(self._buf)
            old = self._buf[8:9] == b"{"  # the old protocol has no type byte
            kind = OLD_PROTOCOL if old else self._buf[8]
            if kind != OLD_PROTOCOL and kind not in HANDSHAKE_TYPES:
                raise ProtocolError(f"unknown Mooncake handshake type {kind}")
            limit = MAX_NOTIFY if kind == NOTIFY else MAX_HANDSHAKE
            if not 1 <= length <= limit:
                raise ProtocolError(f"Mooncake {HANDSHAKE_TYPES.get(kind, 'connection')} message of {length} bytes "
                                    f"(at most {limit})")
            self._total = 8 + length
        total = self._total
        if len(self._buf) < total:
            return None
        if len(self._buf) > total:
            raise ProtocolError("bytes after a Mooncake handshake message")
        old = self._buf[8:9] == b"{"
        kind = OLD_PROTOCOL if old else self._buf[8]
        text = bytes(self._buf[8:total] if old else self._buf[9:total])
        body = parse_json(text, "Mooncake handshake message") if text.strip() else {}
        if not isinstance(body, dict):
            raise ProtocolError("Mooncake handshake JSON is not an object")
        return kind, body


def notification(body: dict) -> tuple[str, str]:
    """``(name, message)`` of a notification message's body: two strings of at most NOTE_MAX characters."""
    name, msg = body.get("name", ""), body.get("notify_msg", "")
    if not isinstance(name, str) or not isinstance(msg, str):
        raise ProtocolError("a Mooncake notification's name and notify_msg must be strings")
    if len(name) + len(msg) > NOTE_MAX:
        raise ProtocolError(f"a Mooncake notification of {len(name) + len(msg)} characters (at most {NOTE_MAX})")
    return name, msg


# -- bounded JSON ---------------------------------------------------------------------------

def parse_json(data: bytes, what: str, limit: int = MAX_HANDSHAKE) -> Any:
    """``data`` (UTF-8 JSON from a peer or a store) as a value, or :class:`ProtocolError` naming ``what``.

    At most ``limit`` bytes and :data:`MAX_DEPTH` levels of nesting, and no
    NaN or Infinity: whatever the bytes, nothing but ProtocolError is raised.
    """
    if len(data) > limit:
        raise ProtocolError(f"{what} is {len(data)} bytes (at most {limit})")
    try:
        return boundedjson.loads(data, limit, MAX_DEPTH)
    except ValueError as e:  # UnicodeDecodeError is a ValueError
        raise ProtocolError(f"{what} is malformed: {e}") from None


# -- TCP data requests -----------------------------------------------------------------

def encode_header(op: int, addr: int, size: int, v2: bool) -> bytes:
    return HEADER.pack(size, addr, op | (V2_FLAG if v2 else 0))


def parse_header(data: bytes | memoryview) -> tuple[int, int, int, bool]:
    """``(op, addr, size, v2)`` of a request header; raises :class:`ProtocolError` on an unknown opcode."""
    size, addr, opcode = HEADER.unpack_from(data)
    op = opcode & ~V2_FLAG
    if op not in (READ, WRITE):
        raise ProtocolError(f"unknown Mooncake TCP opcode {opcode:#x}")
    return op, addr, size, bool(opcode & V2_FLAG)


def encode_status(ok: bool) -> bytes:
    return STATUS.pack(STATUS_OK if ok else STATUS_REJECTED)


def parse_status(data: bytes | memoryview) -> bool:
    """True for OK, False for a rejected request; :class:`ProtocolError` for anything that is no status frame."""
    (word,) = STATUS.unpack_from(data)
    if word & 0xFFFFFFFF00000000 != STATUS_MAGIC:
        raise ProtocolError(f"expected a Mooncake status frame, got {bytes(data[:8]).hex()}")
    if word == STATUS_OK:
        return True
    if word == STATUS_REJECTED:
        return False
    raise ProtocolError(f"unknown Mooncake status {word & 0xFFFFFFFF}")


# -- segment descriptors ------------------------------------------------------------------

def mooncake_descriptor(native: dict, data_host: str, data_port: int) -> dict:
    """The Mooncake descriptor of a moonlet engine whose own descriptor is ``native``.

    Only host buffers are listed (the Mooncake data port serves host memory);
    the native descriptor rides along under :data:`NATIVE_KEY`.
    """
    name = native["name"]
    return {
        "name": name,
        "protocol": "tcp",
        "rdma_server_name": "",
        "tcp_data_host": data_host,
        "tcp_data_port": data_port,
        "tcp_proto_version": 2,
        "buffers": [{"name": name, "addr": b["addr"], "length": b["length"]}
                    for b in native["buffers"] if str(b["location"]).startswith("cpu")],
        "timestamp": time.strftime("%Y-%m-%d %H:%M:%S"),
        NATIVE_KEY: native,
    }


def rpc_meta(host: str, port: int) -> dict:
    """What Mooncake publishes under ``mooncake/rpc_meta/<name>`` in a metadata store."""
    return {"ip_or_host_name": host, "rpc_port": port}


_ADDR_END = 1 << 64
_DATA_ENDPOINT = re.compile(r"(.+):(\d{1,5})(?:;v(\d{1,3}))?", re.ASCII)


def _field(d: dict, key: str, kind: type, default: Any) -> Any:
    """``d[key]`` if it is a ``kind`` (an int is never a bool); ``default`` if absent or null, which
    ``default=None`` refuses."""
    value = d.get(key)
    if value is None and default is not None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"malformed Mooncake segment descriptor: {key} must be {kind.__name__}, got "
                            f"{type(value).__name__}")
    return value


def native_descriptor(d: dict, name: str, rpc: str | None = None) -> dict:
    """A moonlet descriptor (as a dict) for the Mooncake descriptor ``d`` of segment ``name``.

    A descriptor a moonlet engine wrote carries its native one, which is
    returned as is.  A real Mooncake engine's becomes one that only the
    ``mooncake_tcp`` transport reaches.  ``rpc`` is the ``host:port`` of the
    peer's RPC port (handshakes, notifications); its host is used when the
    descriptor names no data host.
    """
    if not isinstance(d, dict):
        raise ProtocolError("Mooncake segment descriptor is not a JSON object")
    if isinstance(d.get(NATIVE_KEY), dict):
        return d[NATIVE_KEY]
    protocol = _field(d, "protocol", str, "")
    port = _field(d, "tcp_data_port", int, 0)
    version = _field(d, "tcp_proto_version", int, 1)
    host = _field(d, "tcp_data_host", str, "") or (rpc or "").rpartition(":")[0]
    if not 0 <= port <= 65535 or not 0 <= version <= 255:
        raise ProtocolError(f"malformed Mooncake segment descriptor: tcp_data_port {port} or "
                            f"tcp_proto_version {version} out of range")
    listed = _field(d, "buffers", list, [])
    buffers = []
    for b in listed:
        if not isinstance(b, dict):
            raise ProtocolError("malformed Mooncake segment descriptor: a buffer is not a JSON object")
        addr, length = _field(b, "addr", int, None), _field(b, "length", int, None)
        if not (0 <= addr and 0 <= length and addr + length <= _ADDR_END):
            raise ProtocolError(f"malformed Mooncake segment descriptor: buffer [{addr:#x}, +{length}) is outside "
                                "the 64-bit address space")
        buffers.append({"addr": addr, "length": length, "location": "cpu:0"})
    endpoints = {"mooncake": protocol}
    if rpc:
        endpoints["mooncake_rpc"] = rpc
    if protocol == "tcp" and port and host:
        endpoints["mooncake_tcp"] = f"{host}:{port};v{version}"
    return {"version": 1, "name": _field(d, "name", str, "") or name, "instance": f"mooncake:{name}:{port}",
            "host": f"mooncake:{host}", "pid": 0, "endpoints": endpoints, "buffers": buffers}


def split_data_endpoint(endpoint: str) -> tuple[str, int, int]:
    """``(host, port, protocol version)`` of a ``mooncake_tcp`` endpoint ``host:port;vN``."""
    m = _DATA_ENDPOINT.fullmatch(endpoint) if isinstance(endpoint, str) else None
    if m is None or int(m[2]) > 65535:
        raise ProtocolError(f"malformed Mooncake data endpoint {str(endpoint)[:100]!r} (want host:port;vN)")
    return m[1].strip("[]"), int(m[2]), int(m[3] or 1)
