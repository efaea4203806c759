"""The target side of Mooncake's wire: its handshake and its TCP data protocol, served from moonlet memory.

A Mooncake engine reaches a moonlet engine in two steps: a handshake on the
engine's RPC port (moonlet's own listener, which hands over connections that
open with a Mooncake handshake message) returns the segment descriptor, then
requests go to the descriptor's ``tcp_data_port``, served here.  Every request
is checked against the registered buffers and their rights and the buffer is
pinned while bytes move, exactly as for moonlet peers; a refused request gets
Mooncake's "rejected" status (protocol v2) and the connection is closed, which
is all a v1 initiator can be told.

Mooncake's wire has no authentication, so an engine serving it must run
without a cluster secret (the engine refuses the combination).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Callable

from ...errors import ProtocolError
from ...memory import Buffer, Denied, MemoryRegistry
from ..tcp.sockio import recv_exact
from . import protocol as MP

log = logging.getLogger("moonlet.mooncake")

_IDLE_TIMEOUT = 600.0  # a data connection with no request for this long is closed


class MooncakeServer:
    """Serves Mooncake peers: handshake messages handed over by the native listener, and the data port."""

    def __init__(self, registry: MemoryRegistry, host: str, advertise: str, describe: Callable[[], dict],
                 on_notify: Callable[[str, str], None], request_timeout: float, max_connections: int) -> None:
        """``describe``: the engine's native descriptor (a dict); ``on_notify(name, msg)``: queue a notification."""
        self._registry = registry
        self._describe = describe
        self._on_notify = on_notify
        self._timeout = request_timeout
        self._slots = threading.BoundedSemaphore(max_connections)
        self._sock = socket.create_server((host, 0), backlog=256)
        self.host = advertise
        self.port: int = self._sock.getsockname()[1]
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name="moonlet-mooncake-accept", daemon=True).start()

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

    # -- data port ---------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closed:
            try:
                sock, _ = self._sock.accept()
            except OSError:
                if self._closed:
                    return
                time.sleep(0.05)
                continue
            if not self._slots.acquire(blocking=False):
                log.warning("refusing a Mooncake data connection: at the limit (EngineConfig.max_connections)")
                sock.close()
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns.add(sock)
            threading.Thread(target=self._serve, args=(sock,), name="moonlet-mooncake-data", daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        head = memoryview(bytearray(MP.HEADER_SIZE))
        try:
            while not self._closed:
                sock.settimeout(_IDLE_TIMEOUT)
                recv_exact(sock, head)
                sock.settimeout(self._timeout)
                if not self._one(sock, *MP.parse_header(head)):
                    return
        except (OSError, ConnectionError, ProtocolError) as e:
            if not isinstance(e, ConnectionError):
                log.info("Mooncake data connection closed: %s", e)
        finally:
            with self._lock:
                self._conns.discard(sock)
            sock.close()
            self._slots.release()

    def _one(self, sock: socket.socket, op: int, addr: int, size: int, v2: bool) -> bool:
        """Serve one request; False when it was refused (the connection then closes)."""
        if size == 0:
            if v2:
                sock.sendall(MP.encode_status(True))
            return True
        write = op == MP.WRITE
        (buf,), pinned = self._registry.acquire([(addr, size)], write=write)
        try:
            if type(buf) is not Buffer or not buf.is_host:
                why = Denied.REASONS[buf] if type(buf) is int else "not host memory (Mooncake peers reach host " \
                                                                  "memory only)"
                log.warning("refused a Mooncake peer's %s of [%#x, +%d): %s", "WRITE" if write else "READ",
                            addr, size, why)
                if v2:
                    sock.sendall(MP.encode_status(False))
                return False
            view = buf.view(addr, size)
            if write:
                recv_exact(sock, view)
                if v2:
                    sock.sendall(MP.encode_status(True))
            else:
                if v2:
                    sock.sendall(MP.encode_status(True))
                sock.sendall(view)
            return True
        finally:
            self._registry.release(pinned)

    def close(self) -> None:
        """Stop serving: close the data listener and every data connection."""
        self._closed = True
        self._sock.close()
        with self._lock:
            conns = list(self._conns)
        for sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
