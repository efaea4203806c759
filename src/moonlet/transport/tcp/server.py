"""Target side of the TCP transport: serves peers' reads and writes of registered memory.

One thread per connection reads frames in order.  Every entry is checked
against the registry before a byte moves; WRITE payloads land straight in
registered memory with ``recvmsg_into`` and READ replies leave straight
from it with ``sendmsg``.  A malformed frame gets an ERROR reply and the
connection is closed; memory is never touched on its behalf.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from typing import Callable

from ...errors import ProtocolError
from ...memory import Buffer, Denied, MemoryRegistry
from . import protocol as P
from .sockio import recv_exact, recv_views, send_all

log = logging.getLogger("moonlet.tcp")

_SCRATCH = 1 << 20


def tune_socket(sock: socket.socket, bufsize: int | None) -> None:
    """Low-latency, large-buffer settings shared by both ends."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if bufsize:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)


class TcpServer:
    """Listener plus one handler thread per accepted connection."""

    def __init__(
        self,
        registry: MemoryRegistry,
        describe: Callable[[], bytes],
        identity: Callable[[], dict],
        host: str,
        port: int,
        socket_buffer: int | None,
    ) -> None:
        self._registry = registry
        self._describe = describe
        self._identity = identity
        self._bufsize = socket_buffer
        self._sock = socket.create_server((host, port), backlog=256, reuse_port=False)
        self.address: tuple[str, int] = self._sock.getsockname()[:2]
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._scratch = memoryview(bytearray(_SCRATCH))
        self._thread = threading.Thread(target=self._accept_loop, name="moonlet-tcp-accept", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop accepting, drop every connection, and wait for the acceptor to exit."""
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=5)

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            tune_socket(conn, self._bufsize)
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="moonlet-tcp-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        prefix = bytearray(P.PREFIX_SIZE)
        pview = memoryview(prefix)
        try:
            while True:
                recv_exact(conn, pview)
                p = P.parse_prefix(prefix)
                if p.kind == P.WRITE or p.kind == P.READ:
                    table = bytearray(p.table_size)
                    recv_exact(conn, memoryview(table))
                    entries = P.parse_entries(p, table)
                    if p.kind == P.WRITE:
                        self._write(conn, p, entries)
                    else:
                        self._read(conn, p, entries)
                    continue
                body = bytearray(p.payload_len)
                if p.payload_len:
                    recv_exact(conn, memoryview(body))
                if p.kind == P.HELLO:
                    P.decode_hello(bytes(body))
                    send_all(conn, [P.encode_control(P.HELLO, json.dumps(self._identity()).encode(), p.req_id)])
                elif p.kind == P.GET_DESC:
                    send_all(conn, [P.encode_control(P.DESC, self._describe(), p.req_id)])
                else:
                    raise ProtocolError(f"a target does not accept {P.KINDS[p.kind]} frames")
        except ProtocolError as e:
            log.warning("closing connection after protocol error: %s", e)
            try:
                conn.sendall(P.encode_control(P.ERROR, str(e).encode()[: P.MAX_CONTROL_BODY]))
            except OSError:
                pass
        except (ConnectionError, OSError):
            pass
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _drain_views(self, length: int) -> list[memoryview]:
        """Scratch views that swallow ``length`` bytes of a refused WRITE entry."""
        out = []
        while length > 0:
            n = min(length, _SCRATCH)
            out.append(self._scratch[:n])
            length -= n
        return out

    def _write(self, conn: socket.socket, p: P.Prefix, entries: list[tuple[int, int]]) -> None:
        resolved, pinned = self._registry.acquire(entries, write=True)
        statuses = bytearray(len(entries))
        views: list[memoryview] = []
        try:
            for i, ((addr, length), buf) in enumerate(zip(entries, resolved)):
                if type(buf) is Buffer and buf.is_host:
                    views.append(buf.view(addr, length))
                else:
                    statuses[i] = buf if type(buf) is int else Denied.NOT_HOST_MEMORY
                    views.extend(self._drain_views(length))
            recv_views(conn, views)
        finally:
            self._registry.release(pinned)
        send_all(conn, [P.encode_response(p.req_id, bytes(statuses), 0)])

    def _read(self, conn: socket.socket, p: P.Prefix, entries: list[tuple[int, int]]) -> None:
        resolved, pinned = self._registry.acquire(entries, write=False)
        statuses = bytearray(len(entries))
        try:
            out: list = [b""]
            total = 0
            for i, ((addr, length), buf) in enumerate(zip(entries, resolved)):
                if type(buf) is Buffer and buf.is_host:
                    out.append(buf.view(addr, length))
                    total += length
                else:
                    statuses[i] = buf if type(buf) is int else Denied.NOT_HOST_MEMORY
            out[0] = P.encode_response(p.req_id, bytes(statuses), total)
            send_all(conn, out)
        finally:
            self._registry.release(pinned)
