"""Raw sockets to an engine or a metadata server: what a peer that is not a moonlet engine sends and reads.

Every socket has a timeout, so a test that waits for bytes that never come fails instead of hanging.
"""

from __future__ import annotations

import http.client
import socket
from typing import Protocol

from moonlet.transport.tcp import protocol as P


class HostPort(Protocol):
    """A server with a ``host`` and a ``port`` (``MetadataServer``)."""

    host: str
    port: int


def connect(name: str, timeout: float = 5.0) -> socket.socket:
    """A TCP connection to ``name`` ("host:port": a p2p segment name, or an endpoint)."""
    host, port = name.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=timeout)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """The next ``n`` bytes from ``sock``; ConnectionError if the peer closes first."""
    out = bytearray(n)
    view, got = memoryview(out), 0
    while got < n:
        r = sock.recv_into(view[got:], n - got)
        if not r:
            raise ConnectionError(f"connection closed after {got} of {n} bytes")
        got += r
    return bytes(out)


def raw_read(sock: socket.socket, addr: int, n: int, req_id: int = 7) -> bytes:
    """One moonlet READ of ``n`` bytes at ``addr`` on a raw connection: the reply's first
    ``P.PREFIX_SIZE + 1 + n`` bytes (prefix, status byte -- 0 when served --, then the bytes);
    ConnectionError if the target closes first."""
    sock.sendall(P.encode_request(P.READ, req_id, [(addr, n)]))
    return recv_exact(sock, P.PREFIX_SIZE + 1 + n)


def unanswered(sockets: list[socket.socket]) -> list[socket.socket]:
    """Those of ``sockets`` the target has neither closed nor answered (nothing to read on them now)."""
    out = []
    for s in sockets:
        s.setblocking(False)
        try:
            s.recv(1 << 16)
        except BlockingIOError:
            out.append(s)
        except OSError:
            pass
    return out


def metadata_http(srv: HostPort, method: str, key: str | None, body: bytes | None = None,
                  timeout: float = 5.0) -> tuple[int, bytes]:
    """One request to a metadata server's REST interface (``/metadata?key=KEY``; no key: bare ``/metadata``):
    the status and the body of the answer."""
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=timeout)
    try:
        conn.request(method, "/metadata" + (f"?key={key}" if key is not None else ""), body=body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()
