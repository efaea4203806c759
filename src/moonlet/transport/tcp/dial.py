"""Opening a connection to a peer engine: TCP, then TLS if configured, then the cluster-secret handshake.

Every connection an engine opens (data lanes, peer-to-peer descriptor fetches,
RDMA queue-pair setup) goes through :func:`dial`, so none can skip a step.
"""

from __future__ import annotations

import socket

from ...errors import ProtocolError, SegmentError
from ...security import PLAIN, Secret, Security
from ...security.auth import InitiatorAuth
from . import protocol as P
from .sockio import recv_exact


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """``"host:port"`` (or ``"[v6]:port"``) to ``(host, port)`` with a clear error."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise SegmentError(f"endpoint {endpoint!r} is not of the form host:port")
    return host.strip("[]"), int(port)


def read_control(sock: socket.socket, expect: int, what: str) -> bytes:
    """Read one control frame of kind ``expect`` (blocking); an ERROR frame raises with the peer's message.

    The magic is checked as soon as it arrives, so a peer that is not moonlet
    (another service on that port) is named at once, even when it answers
    with fewer bytes than a frame prefix and then waits.
    """
    reader = P.FrameReader(initiator=True, control=True)
    magic = len(P.MAGIC_BYTES)
    recv_exact(sock, reader.into[:magic])
    if reader.head[:magic] != P.MAGIC_BYTES:
        raise ProtocolError(f"the peer does not speak moonlet's protocol (bad magic: its reply to {what} "
                            f"starts with {bytes(reader.head[:magic])!r}, not {P.MAGIC_BYTES!r})")
    event = reader.received(magic)
    while event == P.NOTHING:  # each part of the frame is received whole: no byte of a next one is taken
        n = reader.need - reader.got
        recv_exact(sock, reader.into[reader.got:reader.need])
        event = reader.received(n)
    if event == P.PEER_ERROR:
        raise ProtocolError(f"peer refused {what}: {reader.body.decode(errors='replace')}")
    kind = reader.prefix.kind if event == P.CONTROL and reader.prefix is not None else P.RESP
    if kind != expect:
        raise ProtocolError(f"expected {P.KINDS[expect]} in reply to {what}, got {P.KINDS[kind]}")
    return reader.body


def authenticate(sock: socket.socket, secret: Secret | None, endpoint: str, name: str | None = None) -> None:
    """Run the cluster-secret handshake on a fresh connection to ``endpoint`` (nothing to do without a secret).

    The proofs cover ``endpoint`` and, when given, the segment ``name`` meant:
    a peer that relays the handshake to another engine fails it (see ``security/auth.py``); each of its
    messages travels in an AUTH control frame.
    """
    if secret is None:
        return
    auth = InitiatorAuth(secret, endpoint, name)
    sock.sendall(P.encode_control(P.AUTH, auth.start()))
    sock.sendall(P.encode_control(P.AUTH, auth.finish(read_control(sock, P.AUTH, "authentication"))))


def dial(endpoint: str, timeout: float, security: Security = PLAIN, name: str | None = None) -> socket.socket:
    """A connection to ``endpoint`` that has passed TLS and the secret handshake (blocking, ``timeout`` set).

    ``endpoint`` must be the ``host:port`` the peer advertises (from its
    descriptor, or its p2p segment name): the handshake proves the peer is the
    engine advertising it.  ``name``: the segment name meant, when known; a
    peer with another name refuses the connection.

    Raises OSError (ConnectionError) when the peer cannot be reached or TLS fails,
    ProtocolError when the handshake is refused.
    """
    host, port = split_endpoint(endpoint)
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        if security.tls is not None:
            sock = security.tls.wrap_client(sock, timeout)
            sock.settimeout(timeout)
        authenticate(sock, security.secret, endpoint, name)
    except BaseException:
        sock.close()
        raise
    return sock
