"""The target side of Mooncake's wire: its handshake and its TCP data protocol, served from moonlet memory.

A Mooncake engine reaches a moonlet engine in two steps: a handshake on the
engine's RPC port (moonlet's own listener, which hands over connections that
open with a Mooncake handshake message) returns the segment descriptor, then
requests go to the descriptor's ``tcp_data_port``, served here.  Every request
is checked against the registered buffers and their rights and the buffer is
pinned while bytes move, exactly as for moonlet peers (one reactor thread
serves every data connection, receiving into and sending from registered
memory without copies); a refused request gets
Mooncake's "rejected" status (protocol v2) and the connection is closed, which
is all a v1 initiator can be told.

Mooncake's wire has no authentication, so an engine serving it must run
without a cluster secret (the engine refuses the combination).
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from typing import Callable

from ...errors import ProtocolError
from ...memory import Buffer, Denied, MemoryRegistry
from ..reactor import Reactor
from ..tcp.sockio import recv_some_into, sendmsg_some
from . import protocol as MP

log = logging.getLogger("moonlet.mooncake")

_IN = select.POLLIN


class MooncakeServer(Reactor):
    """Serves Mooncake peers: handshake messages handed over by the native listener, and the data port."""

    def __init__(self, registry: MemoryRegistry, host: str, advertise: str, describe: Callable[[], dict],
                 on_notify: Callable[[str, str], None], request_timeout: float, max_connections: int,
                 spin_us: int = 0) -> None:
        """``describe``: the engine's native descriptor (a dict); ``on_notify(name, msg)``: queue a notification;
        ``spin_us``: how long the data reactor polls without sleeping after traffic (as the TCP server)."""
        super().__init__(socket.create_server((host, 0), backlog=256), spin_us, max_connections,
                         "moonlet-mooncake-data")
        self._registry = registry
        self._describe = describe
        self._on_notify = on_notify
        self._timeout = request_timeout
        self.host = advertise
        self.port: int = self._sock.getsockname()[1]
        self._next_sweep = 0.0
        self.start()

    @property
    def endpoint(self) -> str:
        """The data endpoint as a ``mooncake_tcp`` transport endpoint (``host:port;v2``)."""
        return f"{self.host}:{self.port};v2"

    def descriptor(self) -> dict:
        """This engine's segment descriptor in Mooncake's JSON shape."""
        return MP.mooncake_descriptor(self._describe(), self.host, self.port)

    # -- handshake (connections handed over by the native listener) ---------------------

    def claims(self, head: bytes) -> bool:
        """Whether a connection that opened with ``head`` speaks Mooncake's handshake."""
        return not self._closed and MP.looks_like_handshake(head)

    def adopt(self, sock: socket.socket, head: bytes) -> None:
        """Answer the handshake that ``sock`` opened with ``head``, in a thread of its own."""
        threading.Thread(target=self._handshake, args=(sock, head), name="moonlet-mooncake-handshake",
                         daemon=True).start()

    def _handshake(self, sock: socket.socket, head: bytes) -> None:
        try:
            sock.setblocking(True)
            sock.settimeout(5.0)
            reader = MP.HandshakeReader()
            msg = reader.feed(head)
            while msg is None:
                data = sock.recv(65536)
                if not data:
                    return
                msg = reader.feed(data)
            kind, body = msg
            if kind == MP.METADATA:
                reply = self.descriptor()
            elif kind == MP.NOTIFY:
                self._on_notify(str(body.get("name", "")), str(body.get("notify_msg", "")))
                reply = {"name": "", "notify_msg": "success"}
            else:
                # RDMA endpoint setup (CONNECTION / old protocol) or a probe: this engine offers
                # Mooncake peers TCP only, which its descriptor says.
                reply = {"reply_msg": "moonlet serves Mooncake peers over TCP only"}
            sock.sendall(MP.encode_handshake(kind, reply))
            sock.shutdown(socket.SHUT_WR)
            sock.recv(1)  # the peer closes first, as Mooncake's server waits for
        except (OSError, ProtocolError) as e:
            log.info("Mooncake handshake failed: %s", e)
        finally:
            sock.close()

    # -- data port: one reactor thread for every connection ---------------------------------

    def _refuse(self, sock: socket.socket) -> None:
        log.warning("refusing a Mooncake data connection: at the limit (EngineConfig.max_connections)")

    def _admit(self, sock: socket.socket) -> "_DataConn":
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _DataConn(sock)

    def _tick(self, now: float) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + 1.0
        for conn in [c for c in self._conns.values() if c.deadline and now > c.deadline]:
            log.warning("dropping a Mooncake data connection: a request stalled past %.0f s", self._timeout)
            self._drop(conn)

    def _serve(self, conn: "_DataConn", ev: int) -> None:
        try:
            if ev & select.POLLOUT:
                self._flush(conn)
            if ev & (_IN | select.POLLERR | select.POLLHUP) and conn.fd in self._conns:
                self._on_readable(conn, time.monotonic())
        except (OSError, ConnectionError, ProtocolError) as e:
            if not isinstance(e, ConnectionError):
                log.info("Mooncake data connection closed: %s", e)
            self._drop(conn)

    def _on_readable(self, conn: "_DataConn", now: float) -> None:
        """Read what has arrived: a header, or a WRITE's payload straight into registered memory."""
        for _ in range(64):  # a fair share, then the other connections
            if conn.out:  # a reply is still going out: the peer sends nothing meanwhile
                return
            if conn.view is None:
                n = recv_some_into(conn.sock, conn.head, conn.got, MP.HEADER_SIZE)
                if not n:
                    return
                conn.got += n
                if conn.got < MP.HEADER_SIZE:
                    continue
                conn.got = 0
                conn.deadline = now + self._timeout
                self._start(conn, *MP.parse_header(conn.head))
                if conn.fd not in self._conns:
                    return
                continue
            n = recv_some_into(conn.sock, conn.view, conn.got, conn.view.nbytes)
            if not n:
                return
            conn.got += n
            if conn.got == conn.view.nbytes:
                self._finish(conn, [MP.encode_status(True)] if conn.v2 else [])

    def _start(self, conn: "_DataConn", op: int, addr: int, size: int, v2: bool) -> None:
        """A header is in: check and pin the range, then receive the payload or send the bytes."""
        conn.v2 = v2
        if size == 0:
            self._finish(conn, [MP.encode_status(True)] if v2 else [])
            return
        write = op == MP.WRITE
        buf = self._registry.pin_host(addr, size, write)
        if type(buf) is int:
            why = ("not host memory (Mooncake peers reach host memory only)" if buf == Denied.NOT_HOST_MEMORY
                   else Denied.REASONS[buf])
            log.warning("refused a Mooncake peer's %s of [%#x, +%d): %s", "WRITE" if write else "READ", addr, size,
                        why)
            conn.closing = True
            self._finish(conn, [MP.encode_status(False)] if v2 else [])
            return
        conn.pinned = [buf]
        view = buf.view(addr, size)
        if write:
            conn.view, conn.got = view, 0
        else:
            self._finish(conn, ([MP.encode_status(True)] if v2 else []) + [view])

    def _finish(self, conn: "_DataConn", reply: list) -> None:
        """The request's bytes are in (or it was refused): send ``reply``, then unpin and take the next."""
        conn.view = None
        conn.got = 0
        conn.out = reply
        self._flush(conn)

    def _flush(self, conn: "_DataConn") -> None:
        if conn.out:
            sendmsg_some(conn.sock, conn.out)
        if conn.out:
            self._watch(conn, _IN | select.POLLOUT)
            return
        self._registry.release(conn.pinned)
        conn.pinned = []
        conn.deadline = 0.0
        if conn.closing:
            self._drop(conn)
            return
        self._watch(conn, _IN)

    def _watch(self, conn: "_DataConn", mask: int) -> None:
        if conn.mask != mask:
            conn.mask = mask
            self._poll.modify(conn.fd, mask)

    def _drop(self, conn: "_DataConn") -> None:
        if not self._forget(conn):
            return
        self._registry.release(conn.pinned)
        conn.pinned = []
        conn.sock.close()


class _DataConn:
    """One Mooncake data connection: the header being read, or the request being served."""

    __slots__ = ("sock", "fd", "head", "got", "view", "v2", "out", "pinned", "closing", "deadline", "mask")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.head = memoryview(bytearray(MP.HEADER_SIZE))
        self.got = 0
        self.view: memoryview | None = None  # a WRITE's destination while its payload arrives
        self.v2 = False
        self.out: list = []  # reply buffers not yet sent
        self.pinned: list[Buffer] = []
        self.closing = False  # refused: close once the status frame is out
        self.deadline = 0.0  # while a request is being served
        self.mask = _IN
