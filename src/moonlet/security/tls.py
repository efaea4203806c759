"""Optional TLS for every connection of an engine, with the standard library's ``ssl``.

The TCP hot paths move bytes with ``sendmsg`` / ``recvmsg_into`` straight between
sockets and registered memory, which TLS sockets cannot do.  So TLS is a layer
beside them: each TLS connection gets a relay thread that encrypts and decrypts
between the network socket and one end of a local socket pair, and the engine
uses the other end exactly as it uses a plain connection.  That costs a copy
and a thread hop per chunk (see ``docs/performance.md``), and keeps the wire
format, the reactor and the zero-copy paths unchanged.

Both ends present a certificate signed by the cluster's CA and verify the
other's (mutual TLS).  Host names are not checked: engines are addressed by IP
as often as by name, and identity is the CA plus the cluster secret.
"""

from __future__ import annotations

import logging
import selectors
import socket
import ssl
import threading
from collections import deque
from collections.abc import Callable

from ..errors import ConfigError

log = logging.getLogger("moonlet.tls")

_CHUNK = 1 << 20
_CAP = 8 << 20  # bytes buffered per direction before the relay stops reading that side
_TLS_AGAIN = (ssl.SSLWantReadError, ssl.SSLWantWriteError)  # a non-blocking TLS call that must be retried
_Again = type[OSError] | tuple[type[OSError], ...]  # what a non-blocking call raises when it would block


class Tls:
    """Client and server TLS contexts built from the cluster CA and this engine's certificate."""

    def __init__(self, cert: str, key: str, ca: str) -> None:
        self.ca = ca  # the cluster authority's file: engines of one process with the same one trust each other
        try:
            self.server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=ca)
            self.server.load_cert_chain(cert, key)
            self.server.verify_mode = ssl.CERT_REQUIRED
            self.client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
            self.client.load_cert_chain(cert, key)
            self.client.check_hostname = False
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"TLS setup failed (cert {cert!r}, key {key!r}, CA {ca!r}): {e}") from None

    def wrap_client(self, raw: socket.socket, timeout: float) -> socket.socket:
        """Run the client handshake on a connected socket; return the plain end of a relayed pair."""
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small frames must not wait for ACKs
        raw.settimeout(timeout)
        try:
            tls = self.client.wrap_socket(raw)
        except (OSError, ssl.SSLError) as e:
            raw.close()
            raise ConnectionError(f"TLS handshake with {raw_peer(raw)} failed: {e}") from None
        return _relay(tls)

    def wrap_server(self, raw: socket.socket, timeout: float) -> socket.socket:
        """The plain end of a pair whose relay thread runs the server handshake, then relays."""
        mine, theirs = socket.socketpair()

        def start() -> None:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.settimeout(timeout)
            try:
                tls = self.server.wrap_socket(raw, server_side=True)
            except (OSError, ssl.SSLError) as e:
                log.info("TLS handshake from %s failed: %s", raw_peer(raw), e)
                raw.close()
                theirs.close()
                return
            _pump(tls, theirs)

        threading.Thread(target=start, name="moonlet-tls", daemon=True).start()
        return mine


def raw_peer(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "peer"


def _relay(tls: ssl.SSLSocket) -> socket.socket:
    mine, theirs = socket.socketpair()
    threading.Thread(target=_pump, args=(tls, theirs), name="moonlet-tls", daemon=True).start()
    return mine


class _Queue:
    """Bytes waiting to go one way: a FIFO of chunks, consumed from the front without moving the rest."""

    __slots__ = ("chunks", "head", "size")

    def __init__(self) -> None:
        self.chunks: deque[bytes] = deque()
        self.head = 0  # bytes of chunks[0] already sent
        self.size = 0

    def push(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)

    def front(self) -> memoryview:
        return memoryview(self.chunks[0])[self.head:]

    def pop(self, n: int) -> None:
        self.size -= n
        self.head += n
        if self.head == len(self.chunks[0]):
            self.chunks.popleft()
            self.head = 0

    def __bool__(self) -> bool:
        return self.size > 0


def _fill(q: _Queue, recv: Callable[[int], bytes], again: _Again) -> bool:
    """Read chunks into ``q`` until the source would block or ``q`` is full; False once the source closed."""
    while q.size < _CAP:
        try:
            data = recv(_CHUNK)
        except again:
            return True
        if not data:
            return False
        q.push(data)
    return True


def _flush(sock: socket.socket, q: _Queue, again: _Again) -> None:
    """Send from ``q`` until it is empty or ``sock`` would block."""
    while q:
        try:
            q.pop(sock.send(q.front()))
        except again:
            return


def _pump(tls: ssl.SSLSocket, plain: socket.socket) -> None:
    """Move bytes both ways between ``tls`` and ``plain`` until either side closes; one thread, never blocking.

    Each readiness event drains what is available (TLS hands out one 16 KiB
    record per call), so the per-event cost is spread over many records.
    """
    tls.setblocking(False)
    plain.setblocking(False)
    to_plain = _Queue()
    to_tls = _Queue()
    sel = selectors.DefaultSelector()
    masks = {tls: 0, plain: 0}
    tls_open = plain_open = True
    try:
        while True:
            want = {tls: (selectors.EVENT_READ if tls_open and to_plain.size < _CAP else 0)
                    | (selectors.EVENT_WRITE if to_tls else 0),
                    plain: (selectors.EVENT_READ if plain_open and to_tls.size < _CAP else 0)
                    | (selectors.EVENT_WRITE if to_plain else 0)}
            for sock, mask in want.items():
                if mask != masks[sock]:
                    if not masks[sock]:
                        sel.register(sock, mask)
                    elif not mask:
                        sel.unregister(sock)
                    else:
                        sel.modify(sock, mask)
                    masks[sock] = mask
            if tls.pending() and want[tls] & selectors.EVENT_READ:
                ready: dict[object, int] = {tls: selectors.EVENT_READ}  # decrypted bytes already buffered inside ssl
            else:
                ready = {key.fileobj: ev for key, ev in sel.select(timeout=1.0)}
            if ready.get(tls, 0) & selectors.EVENT_READ:
                tls_open = _fill(to_plain, tls.recv, _TLS_AGAIN)
            if ready.get(plain, 0) & selectors.EVENT_READ:
                plain_open = _fill(to_tls, plain.recv, BlockingIOError)
            # Write readiness only wakes the loop; both queues are pushed out every turn.
            _flush(plain, to_plain, BlockingIOError)
            _flush(tls, to_tls, _TLS_AGAIN)
            if not tls_open and not to_plain:
                break  # the remote end closed and everything it sent is delivered
            if not plain_open and not to_tls:
                break  # the engine closed its end and everything it sent is out
    except (OSError, ssl.SSLError) as e:
        log.debug("TLS relay ended: %s", e)
    finally:
        sel.close()
        for sock in (tls, plain):
            try:
                sock.close()
            except OSError:
                pass
