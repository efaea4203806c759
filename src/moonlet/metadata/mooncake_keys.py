"""Metadata in Mooncake's shape as well: how Mooncake engines find a moonlet engine, and how it finds them.

Wraps the engine's backend when ``EngineConfig.mooncake_wire`` is on.  Peer
to peer, a segment is fetched with Mooncake's handshake (a moonlet engine
serving Mooncake's wire answers it with its native descriptor embedded; one
that does not answers with a moonlet error frame, and is then asked the
moonlet way).  With a store, the engine also writes the two keys Mooncake
engines read, ``mooncake/ram/<name>`` (the descriptor) and
``mooncake/rpc_meta/<name>`` (the RPC host and port), and falls back to them
for names that have no moonlet descriptor.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable

from ..errors import MetadataError, ProtocolError, SegmentError
from ..transport.mooncake_wire import protocol as MP
from ..transport.tcp import protocol as P
from ..transport.tcp.dial import split_endpoint
from .base import MetadataBackend

RAM_PREFIX = "mooncake/ram/"
RPC_PREFIX = "mooncake/rpc_meta/"


def exchange(endpoint: str, kind: int, body: dict, timeout: float) -> tuple[int, dict] | None:
    """One Mooncake handshake with the RPC port at ``endpoint``: send ``body``, return the answer.

    None when the peer answered with a moonlet frame: a moonlet engine that
    does not serve Mooncake's wire.  The whole exchange ends within ``timeout``
    (a peer that trickles its answer gets no more), and the answer is read
    bounded (:class:`~moonlet.transport.mooncake_wire.protocol.HandshakeReader`):
    :class:`ProtocolError` for one too long, too deep or malformed.
    """
    host, port = split_endpoint(endpoint)
    deadline = time.monotonic() + timeout
    with socket.create_connection((host, port), timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(MP.encode_handshake(kind, body))
        reader = MP.HandshakeReader()
        first = True
        while True:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise TimeoutError()
                sock.settimeout(left)
                data = sock.recv(min(reader.need, 65536))
            except TimeoutError:
                raise TimeoutError(f"no complete Mooncake handshake answer from {endpoint} within {timeout:g} s") \
                    from None
            if first and data.startswith(P.MAGIC_BYTES):
                return None
            if not data:
                raise ConnectionError("the peer closed the connection before answering")
            first = False
            answer = reader.feed(data)
            if answer is not None:
                return answer


class MooncakeMetadata(MetadataBackend):
    """``inner``, plus Mooncake's keys and handshake (see the module docstring)."""

    def __init__(self, inner: MetadataBackend, timeout: float, own: Callable[[], dict],
                 rpc: Callable[[], dict]) -> None:
        """``own``: this engine's descriptor in Mooncake's shape; ``rpc``: its ``rpc_meta`` entry."""
        self._inner = inner
        self._timeout = timeout
        self._own = own
        self._rpc = rpc
        self.names_are_endpoints = inner.names_are_endpoints
        self.leased = inner.leased
        self.keeps_descriptors = inner.keeps_descriptors

    def publish(self, name: str, descriptor: bytes) -> None:
        self._inner.publish(name, descriptor)
        if not self.names_are_endpoints:
            self._inner.put_key(RAM_PREFIX + name, json.dumps(self._own()).encode())
            self._inner.put_key(RPC_PREFIX + name, json.dumps(self._rpc()).encode())

    def fetch(self, name: str) -> bytes | None:
        if self.names_are_endpoints:
            try:
                answer = exchange(name, MP.METADATA, self._own(), self._timeout)
            except SegmentError:
                raise MetadataError(f"segment name {name!r} is not host:port; in p2p mode open a segment by its "
                                    "engine's host:port") from None
            except (OSError, ConnectionError, ProtocolError) as e:
                raise MetadataError(f"cannot fetch the descriptor of {name!r} with Mooncake's handshake: {e}") \
                    from None
            if answer is None:
                return self._inner.fetch(name)
            return self._native(answer[1], name, name)
        raw = self._inner.fetch(name)
        if raw is not None:
            return raw
        found = self._inner.get_key(RAM_PREFIX + name)
        if found is None:
            return None
        rpc = None
        meta = self._inner.get_key(RPC_PREFIX + name)
        if meta is not None:
            try:
                m = MP.parse_json(meta, f"Mooncake rpc_meta of {name!r}", 4096)
            except ProtocolError as e:
                raise MetadataError(str(e)) from None
            m = m if isinstance(m, dict) else {}
            host, port = m.get("ip_or_host_name"), m.get("rpc_port")
            if not isinstance(host, str) or type(port) is not int or not 0 < port <= 65535:
                raise MetadataError(f"malformed Mooncake rpc_meta of {name!r}: want ip_or_host_name (a string) and "
                                    "rpc_port (1..65535)")
            rpc = f"{host}:{port}"
        try:
            d = MP.parse_json(found, f"Mooncake descriptor of {name!r}", MP.MAX_STORED)
        except ProtocolError as e:
            raise MetadataError(str(e)) from None
        return self._native(d, name, rpc)

    @staticmethod
    def _native(d: dict, name: str, rpc: str | None) -> bytes:
        try:
            return json.dumps(MP.native_descriptor(d, name, rpc)).encode()
        except ProtocolError as e:
            raise MetadataError(f"descriptor of {name!r}: {e}") from None

    def remove(self, name: str) -> None:
        self._inner.remove(name)
        if not self.names_are_endpoints:
            self._inner.delete_key(RAM_PREFIX + name)
            self._inner.delete_key(RPC_PREFIX + name)

    def keepalive(self) -> None:
        self._inner.keepalive()

    def close(self) -> None:
        self._inner.close()

    def __str__(self) -> str:
        return f"{self._inner} (with Mooncake's keys)" if not self.names_are_endpoints else str(self._inner)
