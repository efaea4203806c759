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
"""

from __future__ import annotations

import json
import struct
import time

from ...errors import ProtocolError

CONNECTION, METADATA, NOTIFY, PROBE = 0, 1, 2, 3
OLD_PROTOCOL = 0xFF  # no type byte on the wire; treated like CONNECTION
HANDSHAKE_TYPES = {CONNECTION: "connection", METADATA: "metadata", NOTIFY: "notify", PROBE: "probe"}
MAX_HANDSHAKE = 1 << 20  # Mooncake refuses longer messages

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
    """Collects one handshake message from bytes as they arrive."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> tuple[int, dict] | None:
        """Add ``data``; return ``(type, body)`` once the message is complete, else None."""
        self._buf += data
        if len(self._buf) < 9:
            return None
        (length,) = LENGTH.unpack_from(self._buf)
        if not 1 <= length <= MAX_HANDSHAKE:
            raise ProtocolError(f"Mooncake handshake message of {length} bytes (at most {MAX_HANDSHAKE})")
        old = self._buf[8:9] == b"{"  # the old protocol has no type byte
        total = 8 + length
        if len(self._buf) < total:
            return None
        if len(self._buf) > total:
            raise ProtocolError("bytes after a Mooncake handshake message")
        kind = OLD_PROTOCOL if old else self._buf[8]
        text = bytes(self._buf[8:total] if old else self._buf[9:total])
        if kind != OLD_PROTOCOL and kind not in HANDSHAKE_TYPES:
            raise ProtocolError(f"unknown Mooncake handshake type {kind}")
        try:
            body = json.loads(text) if text.strip() else {}
        except (ValueError, UnicodeDecodeError) as e:
            raise ProtocolError(f"Mooncake handshake JSON is malformed: {e}") from None
        if not isinstance(body, dict):
            raise ProtocolError("Mooncake handshake JSON is not an object")
        return kind, body


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
    try:
        protocol = str(d.get("protocol", ""))
        port = int(d.get("tcp_data_port", 0))
        host = str(d.get("tcp_data_host") or (rpc or "").rpartition(":")[0] or "")
        version = int(d.get("tcp_proto_version", 1))
        buffers = [{"addr": int(b["addr"]), "length": int(b["length"]), "location": "cpu:0"}
                   for b in d.get("buffers", [])]
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise ProtocolError(f"malformed Mooncake segment descriptor: {e!r}") from None
    endpoints = {"mooncake": protocol}
    if rpc:
        endpoints["mooncake_rpc"] = rpc
    if protocol == "tcp" and port and host:
        endpoints["mooncake_tcp"] = f"{host}:{port};v{version}"
    return {"version": 1, "name": str(d.get("name") or name), "instance": f"mooncake:{name}:{port}",
            "host": f"mooncake:{host}", "pid": 0, "endpoints": endpoints, "buffers": buffers}


def split_data_endpoint(endpoint: str) -> tuple[str, int, int]:
    """``(host, port, protocol version)`` of a ``mooncake_tcp`` endpoint ``host:port;vN``."""
    address, _, version = endpoint.partition(";v")
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port), int(version or 1)
