"""Target side of the TCP transport: one reactor thread serves every peer connection.

Each connection is a small state machine (prefix -> table -> payload) fed by
non-blocking ``recv_into`` / ``recvmsg_into`` calls, so WRITE payloads land
straight in registered memory and READ replies leave straight from it via
``sendmsg``, with no Python-side copy and no thread per peer.  After traffic
the reactor polls without sleeping for ``spin_us`` microseconds before it
blocks: on virtual machines a sleep/wake-up pair costs tens of microseconds,
more than a whole small transfer.

Every entry is checked against the registry before a byte moves; a malformed
frame gets an ERROR reply and the connection is closed; memory is never
touched on its behalf.

Nothing a peer sends may cost the others more than a bounded share: any
exception while serving a connection ends that connection only; a refused
WRITE's bytes are swallowed by one reused scratch buffer; every frame counts
against a connection's turn, not only payload bytes; a connection stops being
read while its unsent replies hold too much memory (each queued reply counts a
fixed overhead plus what was copied), or too many bytes of registered memory,
or while all connections' queues together hold too much; connections that
have not authenticated (without a secret: not sent a valid frame) live in a
small quota of their own, newcomers displacing the oldest; and a periodic
sweep closes connections that are idle, that did not authenticate in time, or
whose frame did not arrive in full within the request timeout (releasing what
it pinned, so later bytes never land).
"""

from __future__ import annotations

import json
import logging
import select
import socket
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
from .sockio import recv_some, recv_some_into, sendmsg_some, wake_later

log = logging.getLogger("moonlet.tcp")

_SCRATCH = 1 << 20
_STAGE_BYTES = 128 << 20  # pinned staging for GPU buffers served over TCP
_OUT_CAP = 256 << 20  # stop reading a peer whose unsent replies exceed this many bytes (views, mostly) ...
_HELD_CAP = 4 << 20  # ... or hold this much memory (see _queue) ...
_HELD_TOTAL = 64 << 20  # ... or, with replies of its own queued, while all queues together hold this much
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

    __slots__ = ("sock", "fd", "reader", "req_id", "pinned", "statuses", "lowat", "out", "out_bytes", "out_held",
                 "mask", "sessions", "stage", "closers", "auth", "authed", "born", "first", "drain", "busy", "quiet",
                 "since")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.auth: TargetAuth | None = None
        self.authed = False  # True once the peer proved it holds the cluster secret (none set: sent a valid frame)
        self.born = time.monotonic()
        self.first = True  # no frame read yet
        self.busy = False  # polled since the last sweep
        self.quiet = self.born  # when a sweep last found it busy
        self.req_id = 0  # of the request being served
        self.lowat = 0  # SO_RCVLOWAT in force while a large payload arrives (see sockio.wake_later)
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


class TcpServer(Reactor):
    """Listener plus the reactor thread that serves all accepted connections."""

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
    ) -> None:
        """``security``: TLS on every connection, and serve only peers that prove they hold the secret.
        ``max_connections``: refuse more at once; ``max_unauthenticated`` of them at most not yet
        authenticated (a newcomer closes the oldest of those). ``auth_timeout``: drop a connection that has
        not authenticated within this many seconds; ``request_timeout``: ... whose frame has not arrived in
        full within this many (or whose replies went unread that long); ``idle_timeout``: ... that carried
        nothing for this many."""
        super().__init__(socket.create_server((host, port), backlog=256), spin_us, max_connections,
                         "moonlet-tcp-server")
        self._registry = registry
        self._describe = describe
        self._identity = identity
        self._bufsize = socket_buffer
        self._secret = security.secret
        self._tls = security.tls
        self._auth_timeout = auth_timeout
        self._request_timeout = request_timeout
        self._idle_timeout = idle_timeout
        self._max_pending = min(max_unauthenticated, max_connections)
        self._pending: dict[int, _Conn] = {}  # connections not authenticated yet, by fd, oldest first
        self._period = min(1.0, auth_timeout / 2, request_timeout / 4, idle_timeout / 4)  # between sweeps
        self._wait_ms = max(1, int(self._period * 1000))
        self._next_sweep = 0.0
        self._held = 0  # memory held by the queued replies of every connection
        self._throttled: set[_Conn] = set()  # connections not read only because of _HELD_TOTAL
        self.refused = 0  # connections turned away at the limit
        self.evicted = 0  # unauthenticated connections closed to make room for newcomers
        self.expired = 0  # connections closed by the sweep (authentication, request or idle timeout)
        self.address: tuple[str, int] = self._sock.getsockname()[:2]
        self._scratch = memoryview(bytearray(_SCRATCH))
        self._stage_pool: StagingPool | None = None
        #: CONNECT handlers by service name: body -> (reply body, cleanup run when the connection ends)
        self._services: dict[str, Callable[[dict], tuple[dict, Callable[[], None]]]] = {}
        self._frame_services: dict[int, FrameService] = {}  # frame kind -> who serves it (add_frames)
        #: Another protocol served on this port: connections whose first bytes it ``claims(head)`` are
        #: handed to its ``adopt(sock, head)`` (Mooncake's handshake, when the engine speaks its wire).
        self._foreign: Any = None
        self.start()

    @property
    def connections(self) -> int:
        return len(self._conns)

    def add_service(self, name: str, handler: Callable[[dict], tuple[dict, Callable[[], None]]]) -> None:
        """Answer CONNECT frames naming ``name`` with ``handler(body)`` -> (reply body, cleanup run when the
        connection ends)."""
        self._services[name] = handler

    def add_frames(self, service: FrameService) -> None:
        """Serve request frames of ``service.kinds`` with ``service`` (before any peer connects)."""
        self._frame_services = {**self._frame_services, **{kind: service for kind in service.kinds}}  # atomic

    def add_foreign(self, protocol: Any) -> None:
        """Hand connections whose first bytes ``protocol.claims(head)`` to ``protocol.adopt(sock, head)``:
        another protocol served on this port (Mooncake's handshake, when the engine speaks its wire)."""
        self._foreign = protocol

    def identity(self) -> dict[str, Any]:
        """Who this engine is to peers (the HELLO reply): name, instance, host, pidns, endpoint."""
        return self._identity()

    def close(self) -> None:
        """Stop serving: close the listener and every connection, and join the reactor."""
        super().close()
        if self._stage_pool is not None:
            self._stage_pool.close()

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
        return len(self._pending) < self._max_pending and len(self._conns) < self._max_conns

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
        sock.setblocking(False)
        tune_socket(sock, self._bufsize)
        conn = self._pending[sock.fileno()] = _Conn(sock)
        return conn

    def _promote(self, conn: _Conn) -> None:
        """``conn`` proved the secret (none set: sent a valid frame): out of the unauthenticated quota, and its
        lone requests take the short path."""
        conn.authed = conn.reader.fast = True
        self._pending.pop(conn.fd, None)

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
        if self._throttled and self._held < _HELD_TOTAL:
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
                if self._held < _HELD_TOTAL:
                    mask = _OUT | _IN
                else:
                    self._throttled.add(conn)
        else:
            mask = _IN
        if mask != conn.mask:
            conn.mask = mask
            self._poll.modify(conn.fd, mask)

    def _rearm(self) -> None:
        """All queues together hold less than :data:`_HELD_TOTAL` again: read the connections it stopped."""
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
        while budget > 0 and conn.mask & _IN:  # _set_mask takes input away while replies are over a cap
            if reader.state == P.PAYLOAD:
                n = recv_some(sock, reader.views)
                if not n:
                    break
                budget -= n
                if reader.views or conn.lowat:
                    conn.lowat = wake_later(sock, reader.views, conn.lowat)
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
        if self._foreign is None or head.startswith(P.MAGIC_BYTES) or not self._foreign.claims(head):
            return False
        self._forget(conn)
        conn.reader.detach()
        self._foreign.adopt(conn.sock, head)
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
            conn.sessions = {svc: svc.greet(conn.sock, hello) for svc in set(self._frame_services.values())}
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
            service = self._services.get(body.get("service", ""))
            if service is None:
                raise ProtocolError(f"no service {body.get('service')!r} here; offered: {sorted(self._services)}")
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
            service = self._frame_services.get(kind)
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
                if self._staging() is not None:
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
            pool = self._staging()
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

    def _staging(self) -> StagingPool | None:
        """The pinned pool that carries GPU memory through sockets (made on first use), if CUDA works."""
        if self._stage_pool is None and gpu.available():
            self._stage_pool = StagingPool(_STAGE_BYTES)
        return self._stage_pool

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
        if self._throttled and self._held < _HELD_TOTAL:
            self._rearm()
