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

Handshakes are served by the same reactor thread, never a thread each: at
most :data:`_HANDSHAKES` at once (each buffering at most one message, whose
length its type bounds), each finished within :data:`HANDSHAKE_TIMEOUT` from
its first byte to the peer's close.  A data connection waits for a request
at most ``idle_timeout`` and a request takes at most ``request_timeout``.

Mooncake's wire has no authentication, so an engine serving it must run
without a cluster secret (the engine refuses the combination).
"""

from __future__ import annotations

import logging
import select
import socket
import time
from collections import deque
from collections.abc import Callable

from ...errors import MoonletError, ProtocolError
from ...memory import Buffer, Denied, MemoryRegistry
from ..reactor import Reactor
from ..tcp.sockio import recv_some_into, sendmsg_some
from . import protocol as MP

log = logging.getLogger("moonlet.mooncake")

_IN, _OUT = select.POLLIN, select.POLLOUT
_ERR = select.POLLERR | select.POLLHUP
#: One whole handshake, from its first byte to the peer's close (Mooncake's own server gives each read 5 s).
HANDSHAKE_TIMEOUT = 5.0
#: Handshakes in flight at once (never more than ``max_connections``), besides the data connections.
#: Mooncake's own server answers one at a time; each buffers at most MP.MAX_HANDSHAKE bytes, so
#: together they hold at most 16 MiB.
_HANDSHAKES = 16
#: At the limit, the oldest handshake makes room for a new one once it has been in flight this long (an
#: honest one takes milliseconds), so peers that trickle bytes cannot keep honest ones out.
_GRACE = 1.0
_CHUNK = 65536  # at most this much per handshake recv


class MooncakeServer(Reactor):
    """Serves Mooncake peers: handshake messages handed over by the native listener, and the data port."""

    def __init__(self, registry: MemoryRegistry, host: str, advertise: str, describe: Callable[[], dict],
                 on_notify: Callable[[str, str], None], request_timeout: float, max_connections: int,
                 spin_us: int = 0, idle_timeout: float = 120.0) -> None:
        """``describe``: the engine's native descriptor (a dict); ``on_notify(name, msg)``: queue a notification;
        ``spin_us``: how long the data reactor polls without sleeping after traffic (as the TCP server);
        ``idle_timeout``: close a data connection that sent no request for this long."""
        listener = socket.create_server((host, 0), backlog=256)
        super().__init__(listener, spin_us, max_connections, "moonlet-mooncake-data")
        self._registry = registry
        self._describe = describe
        self._on_notify = on_notify
        self._timeout = request_timeout
        self._idle = idle_timeout
        self._sweep_every = max(0.05, min(1.0, idle_timeout / 2))
        self._wait_ms = int(self._sweep_every * 1000)  # idle turns come at least as often as sweeps are due
        self.host = advertise
        self.port: int = listener.getsockname()[1]
        self._next_sweep = 0.0
        self._max_shakes = min(_HANDSHAKES, max_connections)
        self._shakes: dict[int, _Handshake] = {}  # fd -> handshake in flight, oldest first
        self._adopted: deque[tuple[socket.socket, bytes]] = deque()  # handed over, not yet watched
        self.refused = 0  # handshakes turned away at the limit
        self.start()

    @property
    def endpoint(self) -> str:
        """The data endpoint as a ``mooncake_tcp`` transport endpoint (``host:port;v2``)."""
        return f"{self.host}:{self.port};v2"

    def descriptor(self) -> dict:
        """This engine's segment descriptor in Mooncake's JSON shape."""
        return MP.mooncake_descriptor(self._describe(), self.host, self.port)

    def close(self) -> None:
        """Stop serving, and close the handshakes handed over but not yet taken."""
        super().close()
        while self._adopted:
            self._adopted.popleft()[0].close()

    # -- handshake (connections handed over by the native listener) ---------------------

    def claims(self, head: bytes) -> bool:
        """Whether a connection that opened with ``head`` speaks Mooncake's handshake."""
        return not self._closed and MP.looks_like_handshake(head)

    def adopt(self, sock: socket.socket, head: bytes) -> None:
        """Answer the handshake that ``sock`` opened with ``head`` (called from the listener's thread: the
        reactor takes it over on its next turn)."""
        if self._closed or len(self._adopted) >= self._max_shakes:
            self._turn_away(sock)
            return
        self._adopted.append((sock, head))
        self._wake()

    def _turn_away(self, sock: socket.socket) -> None:
        self.refused += 1
        if self.refused in (1, 10, 100) or self.refused % 1000 == 0:
            log.warning("refused %d Mooncake handshake(s): %d in flight at most", self.refused, self._max_shakes)
        sock.close()

    def _take_adopted(self, now: float) -> None:
        """Watch the handshakes handed over since the last turn, making room at the limit (see :data:`_GRACE`)."""
        while self._adopted:
            sock, head = self._adopted.popleft()
            if len(self._shakes) >= self._max_shakes:
                oldest = next(iter(self._shakes.values()))
                if now - oldest.born < _GRACE:
                    self._turn_away(sock)
                    continue
                log.info("dropping a Mooncake handshake in flight for %.1f s to make room", now - oldest.born)
                self._drop(oldest)
            shake = _Handshake(sock, head, now)
            self._conns[shake.fd] = self._shakes[shake.fd] = shake
            self._poll.register(shake.fd, _IN)
            self._serve_handshake(shake, _IN)  # the bytes the listener read first

    def _serve_handshake(self, shake: _Handshake, ev: int) -> None:
        """Read the message, send the answer, then wait for the peer to close, as Mooncake's server does.

        Whatever goes wrong (the peer's bytes, the engine's callbacks) ends this handshake only.
        """
        try:
            if shake.out is None:
                if shake.head:
                    data, shake.head = shake.head, b""
                else:
                    data = shake.sock.recv(min(shake.reader.need, _CHUNK))
                if not data:
                    raise ConnectionError("the peer closed the connection mid-message")
                self._handshake(shake, data)
            elif shake.out:
                self._send_answer(shake)
            else:
                self._drop(shake)  # the peer closed (or sent more, which no Mooncake peer does)
        except BlockingIOError:
            pass
        except (OSError, MoonletError) as e:
            log.info("Mooncake handshake closed: %s", e)
            self._drop(shake)
        except Exception:  # noqa: BLE001 - a bug in a callback: this handshake fails, the reactor serves on
            log.error("answering a Mooncake handshake failed", exc_info=True)
            self._drop(shake)

    def _handshake(self, shake: _Handshake, data: bytes) -> None:
        msg = shake.reader.feed(data)
        if msg is None:
            return
        kind, body = msg
        if kind == MP.METADATA:
            reply = self.descriptor()
        elif kind == MP.NOTIFY:
            self._on_notify(*MP.notification(body))
            reply = {"name": "", "notify_msg": "success"}
        else:
            # RDMA endpoint setup (CONNECTION / old protocol) or a probe: this engine offers
            # Mooncake peers TCP only, which its descriptor says.
            reply = {"reply_msg": "moonlet serves Mooncake peers over TCP only"}
        shake.out = [MP.encode_handshake(kind, reply)]
        self._send_answer(shake)

    def _send_answer(self, shake: _Handshake) -> None:
        assert shake.out is not None  # set by the caller: the answer to send
        sendmsg_some(shake.sock, shake.out)
        if shake.out:
            self._watch(shake, _OUT)
            return
        shake.sock.shutdown(socket.SHUT_WR)
        self._watch(shake, _IN)  # the peer closes first

    # -- data port: one reactor thread for every connection ---------------------------------

    def _refuse(self, sock: socket.socket) -> None:
        log.warning("refusing a Mooncake data connection: at the limit (EngineConfig.max_connections)")

    def _make_room(self) -> bool:
        return len(self._conns) - len(self._shakes) < self._max_conns  # handshakes have a budget of their own

    def _admit(self, sock: socket.socket) -> _DataConn:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _DataConn(sock, time.monotonic())

    def _tick(self, now: float) -> None:
        if self._adopted:
            self._take_adopted(now)
        if now < self._next_sweep:
            return
        self._next_sweep = now + self._sweep_every
        self._sweep(now)

    def _sweep(self, now: float) -> None:
        """Drop handshakes past their deadline, stalled requests and idle data connections."""
        for conn in list(self._conns.values()):
            if type(conn) is _Handshake:
                if now - conn.born > HANDSHAKE_TIMEOUT:
                    log.info("dropping a Mooncake handshake unfinished after %.0f s", HANDSHAKE_TIMEOUT)
                    self._drop(conn)
                continue
            busy = conn.view is not None or conn.out
            if busy and now - conn.started > self._timeout:
                log.warning("dropping a Mooncake data connection: a request stalled past %.0f s", self._timeout)
                self._drop(conn)
            elif busy or conn.started != conn.seen:  # a request since the last sweep: quiet from now on
                conn.seen = conn.started
                conn.quiet = now
            elif now - conn.quiet > self._idle:
                log.info("closing a Mooncake data connection idle for %.1f s", now - conn.quiet)
                self._drop(conn)

    def _serve(self, conn: _DataConn | _Handshake, ev: int) -> None:
        if isinstance(conn, _Handshake):
            self._serve_handshake(conn, ev)
            return
        try:
            if ev & _OUT:
                self._flush(conn)
            if ev & (_IN | _ERR) and conn.fd in self._conns:
                if conn.out and ev & _ERR:  # input waits for the reply, but a dead peer ends both
                    raise ConnectionError("the peer hung up with a reply pending")
                self._on_readable(conn, time.monotonic())
        except (OSError, ConnectionError, ProtocolError) as e:
            if not isinstance(e, ConnectionError):
                log.info("Mooncake data connection closed: %s", e)
            self._drop(conn)

    def _on_readable(self, conn: _DataConn, now: float) -> None:
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
                conn.started = now
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

    def _start(self, conn: _DataConn, op: int, addr: int, size: int, v2: bool) -> None:
        """A header is in: check and pin the range, then receive the payload or send the bytes."""
        conn.v2 = v2
        if size == 0:
            self._finish(conn, [MP.encode_status(True)] if v2 else [])
            return
        write = op == MP.WRITE
        buf = self._registry.pin_host(addr, size, write)
        if isinstance(buf, int):
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

    def _finish(self, conn: _DataConn, reply: list) -> None:
        """The request's bytes are in (or it was refused): send ``reply``, then unpin and take the next."""
        conn.view = None
        conn.got = 0
        conn.out = reply
        self._flush(conn)

    def _flush(self, conn: _DataConn) -> None:
        if conn.out:
            sendmsg_some(conn.sock, conn.out)
        if conn.out:
            self._watch(conn, _OUT)  # not _IN: nothing is read until the reply is out (else poll never sleeps)
            return
        self._registry.release(conn.pinned)
        conn.pinned = []
        if conn.closing:
            self._drop(conn)
            return
        self._watch(conn, _IN)

    def _watch(self, conn: _DataConn | _Handshake, mask: int) -> None:
        if conn.mask != mask:
            conn.mask = mask
            self._poll.modify(conn.fd, mask)

    def _drop(self, conn: _DataConn | _Handshake) -> None:
        if not self._forget(conn):
            return
        if isinstance(conn, _Handshake):
            del self._shakes[conn.fd]
        else:
            self._registry.release(conn.pinned)
            conn.pinned = []
        conn.sock.close()


class _Handshake:
    """One Mooncake handshake: its message being read, its answer going out, or the peer's close awaited."""

    __slots__ = ("sock", "fd", "head", "born", "reader", "out", "mask")

    def __init__(self, sock: socket.socket, head: bytes, now: float) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.fd = sock.fileno()
        self.head = head  # what the listener read before it handed the connection over
        self.born = now
        self.reader = MP.HandshakeReader()
        self.out: list | None = None  # the answer not yet sent; None while the message is read
        self.mask = _IN


class _DataConn:
    """One Mooncake data connection: the header being read, or the request being served."""

    __slots__ = ("sock", "fd", "head", "got", "view", "v2", "out", "pinned", "closing", "started", "seen", "quiet",
                 "mask")

    def __init__(self, sock: socket.socket, now: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.head = memoryview(bytearray(MP.HEADER_SIZE))
        self.got = 0
        self.view: memoryview | None = None  # a WRITE's destination while its payload arrives
        self.v2 = False
        self.out: list = []  # reply buffers not yet sent
        self.pinned: list[Buffer] = []
        self.closing = False  # refused: close once the status frame is out
        self.started = now  # when the last request arrived (or the connection, before any)
        self.seen = now  # ``started`` as the last sweep saw it
        self.quiet = now  # since when no request arrived, as far as sweeps tell
        self.mask = _IN
