"""Target side of the TCP transport: a few reactor threads serve every peer connection.

Each connection is a small state machine (prefix -> table -> payload) fed by
``recv_into`` / ``recvmsg_into`` calls that do not block, so WRITE payloads
land straight in registered memory and READ replies leave straight from it
via ``sendmsg``, with no Python-side copy and no thread per peer. Connections
are spread over ``reactors`` threads once their peer has authenticated (see
:class:`TcpServer`); a large WRITE payload whose bytes are arriving is taken
with one receive that waits in the kernel (``sockio.PayloadReceiver``), so the copy
runs with the GIL released. After traffic a reactor polls without sleeping
for a while before it blocks (``spin.Spinner``).

Every entry is checked against the registry before a byte moves; a malformed
frame gets an ERROR reply and the connection is closed; memory is never
touched on its behalf.

Nothing a peer sends may cost the others more than a bounded share: any
exception while serving a connection ends that connection only; a refused
WRITE's bytes are swallowed by one reused scratch buffer; every frame counts
against a connection's turn, not only payload bytes, and a turn waits in the
kernel at most once (WAIT_LIMIT), never again for a peer whose wait ran out;
a connection stops being read while its unsent replies hold too much memory
(each queued reply counts a fixed overhead plus what was copied), or too many
bytes of registered memory, or while its reactor's queues together hold more
than that reactor's share of a total; connections that have not
authenticated (without a secret: not sent a valid frame) live in a small
quota of their own, in the accepting reactor, newcomers displacing the
oldest; and a periodic sweep closes connections that are idle, that did not
authenticate in time, or whose frame did not arrive in full within the
request timeout (releasing what it pinned, so later bytes never land).
"""

from __future__ import annotations

import json
import logging
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from ... import gpu
from ...errors import ProtocolError
from ...gpu import GpuError, Stage, StagingPool
from ...memory import Buffer, Denied, MemoryRegistry
from ...security import PLAIN, Security
from ...security.auth import TargetAuth
from ..reactor import Reactor
from . import protocol as P
from .sockio import PayloadReceiver, allow_waits, recv_some_into, sendmsg_some

log = logging.getLogger("moonlet.tcp")

_SCRATCH = 1 << 20
_STAGE_BYTES = 128 << 20  # pinned staging for GPU buffers served over TCP
_OUT_CAP = 256 << 20  # stop reading a peer whose unsent replies exceed this many bytes (views, mostly) ...
_HELD_CAP = 4 << 20  # ... or hold this much memory (see _queue) ...
_HELD_TOTAL = 64 << 20  # ... or, with replies of its own queued, while its reactor's queues hold their share of this
_ENTRY_COST = 256  # memory a queued reply holds per buffer besides copied bytes: lists, views, deque slot
_WORK_PER_TURN = 32 << 20  # bytes one connection may move before others get a turn ...
_FRAME_COST = 512 << 10  # ... where every frame counts this much besides its payload: 64 frames at most
_NONE: tuple = ()  # no views, nothing pinned
_SERVED = bytes(1)  # the status table of a one-entry frame served in full
_IN, _OUT, _ERR = select.POLLIN, select.POLLOUT, select.POLLERR | select.POLLHUP | select.POLLNVAL


def tune_socket(sock: socket.socket, bufsize: int | None) -> None:
    """Low-latency, large-buffer settings shared by both ends."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):  # not the local end of a TLS relay
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if bufsize:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)


class FrameService(Protocol):
    """Serves request frames of kinds beyond WRITE and READ (the same-host PULL and PUSH): registered with
    :meth:`TcpServer.add_frames` by the transport that owns them."""

    kinds: tuple[int, ...]

    def greet(self, sock: socket.socket, hello: dict[str, Any]) -> Any:
        """What this service keeps for a connection whose peer sent ``hello`` (its HELLO frame's body)."""

    def serve(self, session: Any, kind: int, entries: list[tuple[int, int, int]]) -> bytes:
        """Serve one frame's ``entries`` (``session``: :meth:`greet`'s result, None before a HELLO); the
        status table of the reply."""


class _Reply:
    """A reply queued until the socket takes it: the buffers still to send (consumed as they go), what stays
    pinned and staged until then, the bytes left, and the memory it holds (counted against the caps)."""

    __slots__ = ("bufs", "pinned", "stage", "left", "held")

    def __init__(self, bufs: list, pinned: list[Buffer] | tuple, stage: Stage | None, left: int,
                 held: int) -> None:
        self.bufs, self.pinned, self.stage, self.left, self.held = bufs, pinned, stage, left, held


class _Conn:
    """Per-connection parse state and output queue."""

    __slots__ = ("sock", "fd", "reader", "req_id", "pinned", "statuses", "payload", "out", "out_bytes", "out_held",
                 "mask", "sessions", "stage", "closers", "auth", "authed", "born", "first", "drain", "busy", "quiet",
                 "since", "settled")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.auth: TargetAuth | None = None
        self.authed = False  # True once the peer proved it holds the cluster secret (none set: sent a valid frame)
        self.born = time.monotonic()
        self.first = True  # no frame read yet
        self.busy = False  # polled since the last sweep
        self.quiet = self.born  # when a sweep last found it busy
        self.req_id = 0  # of the request being served
        self.payload = PayloadReceiver()  # how its WRITE payloads are received
        self.settled = False  # authenticated and in the reactor that keeps it (waiting receives allowed)
        self.fd = sock.fileno()
        self.reader = P.FrameReader(initiator=False)  # the frames this peer sends (state machine, sans-IO)
        self.out: deque[_Reply] = deque()
        self.out_bytes = 0
        self.out_held = 0
        self.drain: deque = _NONE  # type: ignore[assignment]  # the rest of a WRITE with refused entries
        self.mask = _IN
        self.sessions: dict[FrameService, Any] = {}  # what each frame service made of the peer's HELLO
        self.closers: list[Callable[[], None]] = []  # side channels (CONNECT) that end with this connection
        self._reset()

    def _reset(self) -> None:
        """Forget the frame just served (the reader is at the next frame's head already)."""
        self.pinned: list[Buffer] = _NONE  # type: ignore[assignment]
        self.statuses = b""
        self.stage: Stage | None = None  # host staging of the GPU entries of the frame being received
        self.since = 0.0  # when a sweep first saw this frame under way (0: none has)


class _Shared:
    """What every reactor of one server serves with: settings, the engine's callbacks, the services added
    to it, and the reactors themselves (for counting connections and choosing where a peer goes)."""

    def __init__(self, registry: MemoryRegistry, describe: Callable[[], bytes], identity: Callable[[], dict],
                 socket_buffer: int | None, security: Security, max_connections: int, auth_timeout: float,
                 request_timeout: float, idle_timeout: float, max_unauthenticated: int) -> None:
        self.registry = registry
        self.describe = describe
        self.identity = identity
        self.bufsize = socket_buffer
        self.secret = security.secret
        self.tls = security.tls
        self.max_conns = max_connections
        self.max_pending = min(max_unauthenticated, max_connections)
        self.auth_timeout = auth_timeout
        self.request_timeout = request_timeout
        self.idle_timeout = idle_timeout
        #: CONNECT handlers by service name: body -> (reply body, cleanup run when the connection ends)
        self.services: dict[str, Callable[[dict], tuple[dict, Callable[[], None]]]] = {}
        self.frame_services: dict[int, FrameService] = {}  # frame kind -> who serves it (add_frames)
        #: Another protocol served on this port: connections whose first bytes it ``claims(head)`` are
        #: handed to its ``adopt(sock, head)`` (Mooncake's handshake, when the engine speaks its wire).
        self.foreign: Any = None
        self.loops: list[_Loop] = []
        self.reactors = 1  # how many loops there will be
        self._stage_pool: StagingPool | None = None
        self._stage_lock = threading.Lock()

    def connections(self) -> int:
        return sum(loop.load for loop in self.loops)

    def staging(self) -> StagingPool | None:
        """The pinned pool that carries GPU memory through sockets (made on first use), if CUDA works."""
        if self._stage_pool is None and gpu.available():
            with self._stage_lock:
                if self._stage_pool is None:
                    self._stage_pool = StagingPool(_STAGE_BYTES)
        return self._stage_pool

    def close(self) -> None:
        if self._stage_pool is not None:
            self._stage_pool.close()


class TcpServer:
    """The listener and the reactors that serve its connections.

    The first reactor accepts and holds every connection until its peer has
    authenticated (so the quota of unauthenticated connections and who makes
    room for whom are decided in one thread); then it hands the connection to
    the reactor serving the fewest (itself included). Each reactor is one
    thread doing its own connections' socket work, so peers are served on as
    many cores as there are reactors, each with its own spin window, sweep,
    memory caps and scratch buffer."""

    def __init__(
        self,
        registry: MemoryRegistry,
        describe: Callable[[], bytes],
        identity: Callable[[], dict],
        host: str,
        port: int,
        socket_buffer: int | None,
        spin_us: int = 0,
        security: Security = PLAIN,
        max_connections: int = 1024,
        auth_timeout: float = 5.0,
        request_timeout: float = 30.0,
        idle_timeout: float = 120.0,
        max_unauthenticated: int = 64,
        reactors: int = 1,
    ) -> None:
        """``security``: TLS on every connection, and serve only peers that prove they hold the secret.
        ``max_connections``: refuse more at once; ``max_unauthenticated`` of them at most not yet
        authenticated (a newcomer closes the oldest of those). ``auth_timeout``: drop a connection that has
        not authenticated within this many seconds; ``request_timeout``: ... whose frame has not arrived in
        full within this many (or whose replies went unread that long); ``idle_timeout``: ... that carried
        nothing for this many. ``reactors``: threads serving connections (at least 1)."""
        self._shared = _Shared(registry, describe, identity, socket_buffer, security, max_connections,
                               auth_timeout, request_timeout, idle_timeout, max_unauthenticated)
        listener = socket.create_server((host, port), backlog=256)
        self.address: tuple[str, int] = listener.getsockname()[:2]
        loops = self._shared.loops
        self._shared.reactors = max(1, reactors)
        for i in range(self._shared.reactors):
            name = "moonlet-tcp-server" + (f"-{i}" if reactors > 1 else "")
            loops.append(_Loop(self._shared, listener if i == 0 else None, spin_us, name))
        for loop in loops:
            loop.start()

    @property
    def connections(self) -> int:
        return self._shared.connections()

    @property
    def reactors(self) -> int:
        return len(self._shared.loops)

    @property
    def failure(self) -> str | None:
        """Why a reactor died (None while all serve): once set, that reactor's peers are not served."""
        for loop in self._shared.loops:  # asked on every submit: a plain loop, no generator
            if loop.failure is not None:
                return loop.failure
        return None

    @property
    def refused(self) -> int:
        """Connections turned away at the limit."""
        return self._shared.loops[0].refused

    @property
    def evicted(self) -> int:
        """Unauthenticated connections closed to make room for newcomers."""
        return self._shared.loops[0].evicted

    @property
    def expired(self) -> int:
        """Connections closed by a sweep (authentication, request or idle timeout)."""
        return sum(loop.expired for loop in self._shared.loops)

    def add_service(self, name: str, handler: Callable[[dict], tuple[dict, Callable[[], None]]]) -> None:
        """Answer CONNECT frames naming ``name`` with ``handler(body)`` -> (reply body, cleanup run when the
        connection ends); ``handler`` may be called from several reactor threads at once."""
        self._shared.services[name] = handler

    def add_frames(self, service: FrameService) -> None:
        """Serve request frames of ``service.kinds`` with ``service`` (before any peer connects; called from
        every reactor thread)."""
        shared = self._shared
        shared.frame_services = {**shared.frame_services, **{kind: service for kind in service.kinds}}  # atomic

    def add_foreign(self, protocol: Any) -> None:
        """Hand connections whose first bytes ``protocol.claims(head)`` to ``protocol.adopt(sock, head)``:
        another protocol served on this port (Mooncake's handshake, when the engine speaks its wire)."""
        self._shared.foreign = protocol

    def identity(self) -> dict[str, Any]:
        """Who this engine is to peers (the HELLO reply): name, instance, host, pidns, endpoint."""
        return self._shared.identity()

    def close(self) -> None:
        """Stop serving: the listener first, then every reactor with its connections (each joined)."""
        for loop in self._shared.loops:
            loop.close()
        self._shared.close()


class _Loop(Reactor):
    """One reactor thread of a :class:`TcpServer`: serves the connections it holds; the first also accepts."""

    def __init__(self, shared: _Shared, listener: socket.socket | None, spin_us: int, name: str) -> None:
        super().__init__(listener, spin_us, shared.max_conns, name)
        self._shared = shared
        self._registry = shared.registry
        self._describe = shared.describe
        self._identity = shared.identity
        self._bufsize = shared.bufsize
        self._secret = shared.secret
        self._tls = shared.tls
        self._auth_timeout = shared.auth_timeout
        self._request_timeout = shared.request_timeout
        self._idle_timeout = shared.idle_timeout
        self._max_pending = shared.max_pending
        self._pending: dict[int, _Conn] = {}  # connections not authenticated yet, by fd, oldest first
        self._moving: list[_Conn] = []  # authenticated while served here: handed to the least busy reactor
        self._period = min(1.0, shared.auth_timeout / 2, shared.request_timeout / 4,
                           shared.idle_timeout / 4)  # between sweeps
        self._wait_ms = max(1, int(self._period * 1000))
        self._next_sweep = 0.0
        self._held = 0  # memory held by the queued replies of every connection of this reactor
        #: this reactor's share of _HELD_TOTAL: all reactors' queues together stay under it
        self._held_cap = max(_HELD_CAP, _HELD_TOTAL // shared.reactors)
        self._throttled: set[_Conn] = set()  # connections not read only because of _held_cap
        self.refused = 0  # connections turned away at the limit
        self.evicted = 0  # unauthenticated connections closed to make room for newcomers
        self.expired = 0  # connections closed by the sweep (authentication, request or idle timeout)
        self._scratch = memoryview(bytearray(_SCRATCH))

    # -- reactor -------------------------------------------------------------------

    def _tick(self, now: float) -> None:
        if now >= self._next_sweep:  # busy or idle, stalled peers go
            self._sweep(now)

    def _serve(self, conn: _Conn, ev: int) -> None:
        conn.busy = True
        try:
            if ev & (_OUT | _ERR):  # an error shows as a failed send, and ends the connection
                self._flush(conn)
            if ev & (_IN | _ERR):
                self._on_readable(conn)
        except ProtocolError as e:
            log.warning("closing connection after protocol error: %s", e)
            self._fail(conn, str(e))
        except OSError:
            self._drop(conn)
        except Exception as e:  # noqa: BLE001 - whatever a peer's bytes provoke ends its connection only
            log.error("closing a connection: serving it failed", exc_info=True)
            self._fail(conn, f"the target failed to serve this connection: {type(e).__name__}: {e}")
        if self._moving:
            self._move_on()

    def _move_on(self) -> None:
        """Hand the connections that authenticated during this turn to the reactor serving the fewest (this
        one included): from now on only that reactor's thread touches them."""
        moving, self._moving = self._moving, []
        for conn in moving:
            if self._conns.get(conn.fd) is not conn:  # dropped meanwhile
                continue
            live = [loop for loop in self._shared.loops if loop.failure is None]  # a dead one takes nobody
            loop = min(live, key=lambda loop: loop.load) if live else self
            if loop is self:
                conn.settled = True
                continue
            self._forget(conn)
            self._held -= conn.out_held
            self._throttled.discard(conn)
            if not loop.hand(conn):  # that reactor is closing: so is the server
                self._conns[conn.fd] = conn
                self._drop(conn)
        if self._throttled and self._held < self._held_cap:
            self._rearm()

    def _adopt(self, conn: _Conn) -> None:
        """Serve ``conn``, authenticated in the accepting reactor, from here on: with its queued replies
        counted here and its input and output polled as they were."""
        conn.settled = True
        self._conns[conn.fd] = conn
        self._held += conn.out_held
        self._poll.register(conn.fd, conn.mask)
        self._set_mask(conn)

    def _fail(self, conn: _Conn, message: str) -> None:
        """Tell ``conn``'s peer what went wrong (an ERROR frame, if the socket takes it now), then drop it."""
        try:
            conn.sock.send(P.encode_error(message), socket.MSG_DONTWAIT)
        except OSError:
            pass
        self._drop(conn)

    def _sweep(self, now: float) -> None:
        """Drop connections that outstay their welcome: not authenticated within ``auth_timeout``; a frame
        not in full ``request_timeout`` after the first sweep that saw it under way; no traffic at all for
        ``idle_timeout`` (for ``request_timeout`` while replies wait that their peer does not read)."""
        self._next_sweep = now + self._period
        stale: dict[_Conn, str] = {}
        unproven = "did not authenticate" if self._secret is not None else "sent no valid frame"
        for conn in self._pending.values():  # oldest first
            if now - conn.born <= self._auth_timeout:
                break
            stale[conn] = f"it {unproven} within {self._auth_timeout:g} s"
        for conn in self._conns.values():
            if conn.reader.under_way:
                if not conn.since:
                    conn.since = now
                elif now - conn.since > self._request_timeout:
                    stale[conn] = (f"a frame did not arrive in full within {self._request_timeout:g} s "
                                   "(EngineConfig.request_timeout)")
            elif conn.busy:
                conn.busy = False
                conn.quiet = now
            elif conn.out:
                if now - conn.quiet > self._request_timeout:
                    stale[conn] = f"its peer read none of its replies for {self._request_timeout:g} s"
            elif now - conn.quiet > self._idle_timeout:
                stale[conn] = f"idle for {self._idle_timeout:g} s (EngineConfig.idle_timeout)"
        for conn, why in stale.items():
            log.info("dropping a connection: %s", why)
            self.expired += 1
            self._drop(conn)

    def _make_room(self) -> bool:
        """Whether a newcomer may be admitted: under both limits, or once a connection that has not
        authenticated yet is closed to make room: the oldest that has still sent nothing when read one last
        time, else the oldest. Newcomers displace silent sockets before peers half way through the
        handshake, and a peer whose first bytes came a moment ago is read, not judged silent; peers that got
        through always stay."""
        if self._has_room():
            return True
        victim = None
        for conn in list(self._pending.values()):  # oldest first
            if conn.first and not conn.reader.got:
                self._serve(conn, _IN)  # a last look: it may have spoken since it was polled
                if self._has_room():  # it proved itself (no secret set), or failed and went
                    return True
                if conn.first and not conn.reader.got and conn.fd in self._pending:
                    victim = conn
                    break
        if victim is None:
            if not self._pending:
                return False
            victim = next(iter(self._pending.values()))
        self.evicted += 1
        if self.evicted in (1, 10, 100) or self.evicted % 1000 == 0:
            log.warning("closed %d connection(s) that had not authenticated, to make room for newcomers "
                        "(EngineConfig.max_unauthenticated %d, max_connections %d)", self.evicted,
                        self._max_pending, self._max_conns)
        self._fail(victim, "closed to make room: too many connections have not authenticated yet")
        return True

    def _has_room(self) -> bool:
        return len(self._pending) < self._max_pending and self._shared.connections() < self._max_conns

    def _refuse(self, sock: socket.socket) -> None:
        self.refused += 1
        if self.refused in (1, 10, 100) or self.refused % 1000 == 0:
            log.warning("refused %d connection(s): at the limit of %d (EngineConfig.max_connections)",
                        self.refused, self._max_conns)
        try:
            sock.send(P.encode_error(f"too many connections (limit {self._max_conns})"), socket.MSG_DONTWAIT)
        except OSError:
            pass

    def _admit(self, sock: socket.socket) -> _Conn:
        if self._tls is not None:  # the engine side of a relay whose thread runs TLS with the peer
            sock = self._tls.wrap_server(sock, self._auth_timeout)
        allow_waits(sock)
        tune_socket(sock, self._bufsize)
        conn = self._pending[sock.fileno()] = _Conn(sock)
        return conn

    def _promote(self, conn: _Conn) -> None:
        """``conn`` proved the secret (none set: sent a valid frame): out of the unauthenticated quota, and its
        lone requests take the short path."""
        conn.authed = conn.reader.fast = True
        self._pending.pop(conn.fd, None)
        if len(self._shared.loops) > 1:
            self._moving.append(conn)
        else:
            conn.settled = True

    def _forget(self, conn: _Conn) -> bool:
        self._pending.pop(conn.fd, None)
        return super()._forget(conn)

    def _drop(self, conn: _Conn) -> None:
        if not self._forget(conn):
            return
        self._registry.release(conn.pinned)
        if conn.stage is not None:
            conn.stage.release()
        for reply in conn.out:
            self._registry.release(reply.pinned)
            if reply.stage is not None:
                reply.stage.release()
        conn.out.clear()
        self._held -= conn.out_held
        conn.out_held = 0
        self._throttled.discard(conn)
        if self._throttled and self._held < self._held_cap:
            self._rearm()
        for close in conn.closers:
            try:
                close()
            except Exception:  # noqa: BLE001 - a side channel's cleanup failing must not leave the socket open
                log.error("closing a side channel of a dropped connection failed", exc_info=True)
        conn.sock.close()

    def _set_mask(self, conn: _Conn) -> None:
        """Poll for input unless the replies ``conn`` queued are over a cap; for output while any wait."""
        if conn.out:
            mask = _OUT
            if conn.out_bytes < _OUT_CAP and conn.out_held < _HELD_CAP:
                if self._held < self._held_cap:
                    mask = _OUT | _IN
                else:
                    self._throttled.add(conn)
        else:
            mask = _IN
        if mask != conn.mask:
            conn.mask = mask
            self._poll.modify(conn.fd, mask)

    def _rearm(self) -> None:
        """This reactor's queues together hold less than its share of :data:`_HELD_TOTAL` again: read the
        connections that stopped."""
        throttled, self._throttled = self._throttled, set()
        for conn in throttled:
            self._set_mask(conn)

    # -- input ---------------------------------------------------------------------

    def _on_readable(self, conn: _Conn) -> None:
        """Move as many bytes as are available (up to a fair share), frame by frame: the connection's
        :class:`~.protocol.FrameReader` says where they go and what each completed part is."""
        budget = _WORK_PER_TURN
        sock = conn.sock
        reader = conn.reader
        waited = False
        while budget > 0 and conn.mask & _IN:  # _set_mask takes input away while replies are over a cap
            if reader.state == P.PAYLOAD:
                # Waiting in the kernel for the rest of a payload: once a turn, on a connection this reactor
                # keeps. A peer can make a reactor wait at most WAIT_LIMIT for nothing, once.
                n, now_waited = conn.payload.receive(sock, reader.views, conn.settled and not waited)
                waited = waited or now_waited
                if not n:
                    break
                budget -= n
                if not reader.views:
                    self._write_done(conn)
                continue
            n = recv_some_into(sock, reader.into, reader.got, reader.need)
            if not n:
                break
            if conn.first:  # every connection starts unauthenticated: it may speak another protocol
                if self._hand_over(conn, bytes(reader.head[:reader.got + n])):
                    return
                conn.first = reader.got + n < reader.need
            what = reader.received(n)
            if not conn.authed and self._secret is not None and reader.prefix is not None \
                    and reader.prefix.kind != P.AUTH:
                raise ProtocolError("authentication required: this engine serves only peers holding its cluster "
                                    "secret (set the same MOONLET_SECRET or EngineConfig.secret_file on both sides)")
            if what == P.NOTHING:
                continue
            budget -= _FRAME_COST
            conn.since = 0.0  # a frame's head is in: the sweep times what follows of it afresh
            if what == P.SINGLE:
                if not self._on_single(conn, *reader.single):
                    reader.take_single_the_long_way()
                    self._on_table(conn)
            elif what == P.REQUEST:
                self._on_table(conn)
            else:
                self._on_control(conn)
        self._set_mask(conn)

    def _hand_over(self, conn: _Conn, head: bytes) -> bool:
        """Give a connection whose first bytes ``head`` another protocol claims to it (Mooncake's handshake,
        whose shortest messages are shorter than a moonlet frame head); False if it stays ours."""
        if self._shared.foreign is None or head.startswith(P.MAGIC_BYTES) or not self._shared.foreign.claims(head):
            return False
        self._forget(conn)
        conn.reader.detach()
        self._shared.foreign.adopt(conn.sock, head)
        return True

    def _on_single(self, conn: _Conn, kind: int, req_id: int, addr: int, length: int) -> bool:
        """Serve a lone WRITE or READ of host memory, the latency-bound case, in few steps; False leaves
        it to the general path (a refusal or GPU memory, which it explains or stages)."""
        buf = self._registry.pin_host(addr, length, kind == P.WRITE)
        if isinstance(buf, int):
            return False
        conn.req_id = req_id
        view = buf.view(addr, length)
        if kind == P.WRITE:
            conn.pinned, conn.statuses = [buf], _SERVED
            conn.reader.expect_payload([view])
            return True
        head = P.encode_response(req_id, _SERVED, length)
        self._queue(conn, [head, view], len(head) + length, [buf])
        return True

    def _on_control(self, conn: _Conn) -> None:
        p = conn.reader.prefix
        assert p is not None
        if p.kind == P.HELLO:
            hello = P.decode_hello(conn.reader.body)
            conn.sessions = {svc: svc.greet(conn.sock, hello) for svc in set(self._shared.frame_services.values())}
            reply = P.encode_control(P.HELLO, json.dumps(self._identity()).encode(), p.req_id)
        elif p.kind == P.AUTH:
            if self._secret is None:
                raise ProtocolError("this engine has no cluster secret and cannot prove itself; set the same "
                                    "MOONLET_SECRET on both sides")
            proof = conn.reader.body
            if conn.auth is None:
                conn.auth = TargetAuth(self._secret, self._identity())
                challenge = P.encode_control(P.AUTH, conn.auth.challenge(proof))
                self._queue(conn, [challenge], len(challenge))
            else:
                conn.auth.verify(proof)
                self._promote(conn)
            return
        elif p.kind == P.CONNECT:
            body = P.decode_connect(conn.reader.body)
            service = self._shared.services.get(body.get("service", ""))
            if service is None:
                raise ProtocolError(f"no service {body.get('service')!r} here; "
                                    f"offered: {sorted(self._shared.services)}")
            answer, cleanup = service(body)
            conn.closers.append(cleanup)
            reply = P.encode_connect(answer)
        else:
            reply = P.encode_control(P.DESC, self._describe(), p.req_id)
        if not conn.authed:  # no secret is set (else only AUTH gets here): a valid frame is proof enough
            self._promote(conn)
        self._queue(conn, [reply], len(reply))

    def _on_table(self, conn: _Conn) -> None:
        """A request frame's table is in (``reader.prefix``, ``reader.entries``): check and pin every range,
        then take the WRITE payload into memory or queue the READ reply."""
        reader = conn.reader
        p = reader.prefix
        assert p is not None
        if not conn.authed:  # no secret is set (else none gets here): a valid frame is proof enough
            self._promote(conn)
        kind = p.kind
        entries = reader.entries
        if kind != P.WRITE and kind != P.READ:  # PULL / PUSH: the same-host target copies; the reply: statuses
            service = self._shared.frame_services.get(kind)
            if service is None:  # this engine runs no same-host transport: the peer falls back to TCP
                statuses = P.STATUS_BYTES[Denied.ATTACH_REFUSED] * len(entries)
            else:
                statuses = service.serve(conn.sessions.get(service), kind, entries)
            head = P.encode_response(p.req_id, statuses, 0)
            self._queue(conn, [head], len(head))
            return
        write = kind == P.WRITE
        resolved, pinned = self._registry.acquire(entries, write)
        refused: bytearray | None = None  # a status per entry, made at the first refusal
        views: list = []  # memoryviews, and for a WRITE the byte count of each refused entry
        gpu_ranges: list[tuple[int, int, int]] = []
        gpu_slots: list[int] = []  # where each GPU entry's views go in ``views``
        for i, (addr, length) in enumerate(entries):
            buf = resolved[i]
            if type(buf) is Buffer:
                if buf.is_host:
                    views.append(buf.view(addr, length))
                    continue
                if self._shared.staging() is not None:
                    gpu_slots.append(len(views))
                    views.append(memoryview(b""))  # replaced by a staging view below
                    gpu_ranges.append((addr, length, int(buf.location.split(":")[1])))
                    continue
            if refused is None:
                refused = bytearray(len(entries))
            refused[i] = buf if type(buf) is int else Denied.NOT_HOST_MEMORY
            if write:
                views.append(length)  # swallowed by the scratch buffer, a MiB at a time (_drain_next)
        statuses = bytes(refused) if refused is not None else bytes(len(entries))
        stage: Stage | None = None
        if gpu_ranges:
            pool = self._shared.staging()
            assert pool is not None  # GPU entries were taken only with a pool
            stage = pool.take(gpu_ranges)
            for slot, v in zip(gpu_slots, stage.views()):
                views[slot] = v
        if write:
            conn.req_id, conn.pinned, conn.statuses, conn.stage = p.req_id, pinned, statuses, stage
            if refused is not None:
                conn.drain = deque(views)
                self._drain_next(conn)
            else:
                reader.expect_payload(views)
            return
        if stage is not None:
            try:
                stage.to_host()
            except GpuError as e:
                stage.release()
                raise ProtocolError(f"GPU staging failed on the target: {e}") from None
        total = sum(v.nbytes for v in views)
        conn._reset()
        head = P.encode_response(p.req_id, statuses, total)
        self._queue(conn, [head, *views], len(head) + total, pinned, stage)

    def _write_done(self, conn: _Conn) -> None:
        if conn.drain:  # the payload goes on past a refused entry
            self._drain_next(conn)
            return
        if conn.stage is not None:
            stage, conn.stage = conn.stage, None
            try:
                stage.to_gpu()
            except GpuError as e:
                raise ProtocolError(f"GPU staging failed on the target: {e}") from None
            finally:
                stage.release()
        pinned = conn.pinned
        reply = P.encode_response(conn.req_id, conn.statuses, 0)
        conn.reader.payload_done()
        conn._reset()
        try:
            self._queue(conn, [reply], len(reply))  # the initiator waits for this; unpinning can follow
        finally:
            self._registry.release(pinned)

    def _drain_next(self, conn: _Conn) -> None:
        """Point the reader's payload at the next stretch of a WRITE payload with refused entries: the views of
        the served entries up to the next refused one, or the scratch buffer for up to a MiB of a refused entry's
        bytes. However large the entry (a 40-byte frame may announce 2**48 bytes), they pass through that one
        reused buffer, never a list that grows with them; the request deadline (see :meth:`_sweep`) ends a
        payload that does not come. The connection stays usable, and the initiator learns per entry what was
        refused."""
        plan = conn.drain
        item = plan.popleft()
        if type(item) is int:
            if item > _SCRATCH:
                plan.appendleft(item - _SCRATCH)
                item = _SCRATCH
            conn.reader.expect_payload([self._scratch[:item]])
            return
        views = [item]
        while plan and type(plan[0]) is not int:
            views.append(plan.popleft())
        conn.reader.expect_payload(views)

    # -- output --------------------------------------------------------------------

    def _queue(self, conn: _Conn, bufs: list, nbytes: int, pinned: list[Buffer] | tuple = _NONE,
               stage: Stage | None = None) -> None:
        """Send ``bufs`` (``nbytes`` in all) after what is queued; keep ``pinned`` and ``stage`` until sent."""
        if not conn.out:  # the usual case: the socket takes the whole reply at once
            nbytes -= sendmsg_some(conn.sock, bufs, nbytes)
            if not bufs:
                self._registry.release(pinned)
                if stage is not None:
                    stage.release()
                return
        # What the queued reply costs in memory: per buffer its view and list slot, plus the bytes copied for
        # it (all of a control or WRITE reply; of a READ reply only the head, the rest being views).
        if pinned or stage is not None:
            held = _ENTRY_COST * len(bufs) + (len(bufs[0]) if type(bufs[0]) is bytes else 0)
        else:
            held = _ENTRY_COST + nbytes
        conn.out.append(_Reply(bufs, pinned, stage, nbytes, held))
        conn.out_bytes += nbytes
        conn.out_held += held
        self._held += held
        self._set_mask(conn)

    def _flush(self, conn: _Conn) -> None:
        """Send queued replies until the socket would block; unpin buffers whose bytes are out."""
        while conn.out:
            reply = conn.out[0]
            sent = sendmsg_some(conn.sock, reply.bufs, reply.left)
            reply.left -= sent
            conn.out_bytes -= sent
            if reply.bufs:
                break
            conn.out.popleft()
            conn.out_held -= reply.held
            self._held -= reply.held
            self._registry.release(reply.pinned)
            if reply.stage is not None:
                reply.stage.release()
        self._set_mask(conn)
        if self._throttled and self._held < self._held_cap:
            self._rearm()
