"""The target half of the attached same-host path: PULL and PUSH frames served by cross-memory copies.

Registered with the TCP server (:meth:`TcpServer.add_frames`), which parses
the frames and hands over their entries; this module decides whether the peer
may be attached to and moves the bytes with one ``process_vm_readv`` /
``process_vm_writev`` call per frame, after checking and pinning every range
of ours as for any request.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable
from typing import Any

from ...memory import Buffer, Denied, MemoryRegistry
from ..tcp import protocol as P
from . import cma

log = logging.getLogger("moonlet.shm")

_SERVED = bytes(1)  # the status table of a one-entry frame served in full


class AttachTarget:
    """Serves PULL (a peer's WRITE: we read its memory into ours) and PUSH (a peer's READ) frames.

    ``identity()`` gives this engine's ``host`` and ``pidns``: the pid a peer
    claims in its HELLO is believed only if it shares both and really holds the
    other end of the connection.
    """

    kinds: tuple[int, ...] = (P.PULL, P.PUSH)

    def __init__(self, registry: MemoryRegistry, identity: Callable[[], dict[str, Any]]) -> None:
        self._registry = registry
        self._identity = identity

    def greet(self, sock: socket.socket, hello: dict[str, Any]) -> int:
        """The peer's pid if we may copy straight between its memory and ours, else 0 (the connection's state)."""
        pid = hello.get("pid", 0)
        me = self._identity()
        if not (cma.AVAILABLE and type(pid) is int and pid > 0 and hello.get("host") == me["host"]
                and hello.get("pidns") == me["pidns"]):
            return 0
        return pid if cma.socket_owned_by(sock, pid) else 0

    def serve(self, pid: int | None, kind: int, entries: list[tuple[int, int, int]]) -> bytes:
        """Copy for one PULL or PUSH frame of ``entries`` (our addr, length, peer's addr); the status table."""
        if not pid:
            return bytes([Denied.ATTACH_REFUSED]) * len(entries)
        if len(entries) == 1:  # a lone same-host request, the latency-bound case: no lists
            return self._one(pid, kind == P.PULL, *entries[0])
        pull = kind == P.PULL
        statuses = bytearray(len(entries))
        resolved, pinned = self._registry.acquire([(a, n) for a, n, _ in entries], write=pull)
        try:
            ours: list[int] = []
            theirs: list[int] = []
            moved = []
            for i, ((addr, length, peer_addr), buf) in enumerate(zip(entries, resolved)):
                if type(buf) is Buffer and buf.is_host:
                    ours += (addr, length)
                    theirs += (peer_addr, length)
                    moved.append(i)
                else:
                    statuses[i] = buf if type(buf) is int else Denied.NOT_HOST_MEMORY
            if moved:
                try:
                    cma.copy(pid, ours, theirs, into_local=pull)
                except OSError as e:
                    code = _failed(pid, e)
                    for i in moved:
                        statuses[i] = code
        finally:
            self._registry.release(pinned)
        return bytes(statuses)

    def _one(self, pid: int, pull: bool, addr: int, length: int, peer_addr: int) -> bytes:
        """:meth:`serve` of one entry, without its lists."""
        buf = self._registry.pin_host(addr, length, pull)
        if isinstance(buf, int):
            return P.STATUS_BYTES[buf]
        try:
            cma.copy(pid, [addr, length], [peer_addr, length], into_local=pull)
        except OSError as e:
            return P.STATUS_BYTES[_failed(pid, e)]
        finally:
            self._registry.release([buf])
        return _SERVED


def _failed(pid: int, error: OSError) -> int:
    """The status for entries whose cross-memory copy with ``pid`` raised ``error``."""
    log.info("cross-memory copy with pid %d failed: %s", pid, error)
    if error.errno in (errno.EPERM, errno.ESRCH, errno.ENOSYS):
        return Denied.ATTACH_REFUSED
    return Denied.INITIATOR_FAULT
