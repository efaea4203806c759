"""Scatter-gather socket helpers: move bytes between sockets and memoryviews without copies in Python.

Each helper consumes its list of buffers in place (sent or filled buffers are
removed, a partly done one is replaced by its remainder), so a caller can
resume where the kernel stopped.
"""

from __future__ import annotations

import socket
import struct

# Linux caps one sendmsg/recvmsg at 1024 iovecs; stay well below.
_MAX_IOV = 512
# While at least this much of a payload is still to come, poll reports the socket readable only once
# this much has arrived (SO_RCVLOWAT): fewer, larger receives. 1 MiB x 32 on loopback, 2 lanes, three
# interleaved runs each (2026-12-02): WRITE 5.15-5.66 GB/s at 128 KiB, 4.58-4.71 at 256 KiB; READ
# 5.86-6.10 vs 5.24-5.66; 64 KiB (4.7 / 4.2) and 512 KiB (5.2 / 4.8) lower, 192 KiB in between.
LOWAT = 128 * 1024


#: How long one waiting receive (:func:`recv_some` with ``wait``) may block for bytes that do not come
#: (SO_RCVTIMEO), seconds: a stalled peer costs the other connections of a reactor at most this per frame.
WAIT_LIMIT = 0.002


def allow_waits(sock: socket.socket) -> None:
    """Make ``sock`` blocking with a receive timeout of :data:`WAIT_LIMIT`: every call made without
    ``wait`` passes MSG_DONTWAIT and stays non-blocking; a waiting receive blocks at most that long."""
    sock.setblocking(True)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, int(WAIT_LIMIT * 1e6)))


def _consume(bufs: list, n: int) -> None:
    """Drop the first ``n`` bytes of ``bufs``."""
    i = 0
    while i < len(bufs):
        size = bufs[i].nbytes if isinstance(bufs[i], memoryview) else len(bufs[i])
        if n < size:
            break
        n -= size
        i += 1
    del bufs[:i]
    if n:
        bufs[0] = memoryview(bufs[0])[n:]


def send_all(sock: socket.socket, bufs: list, total: int = -1) -> None:
    """Send every buffer in ``bufs`` in order, blocking, with as few ``sendmsg`` calls as possible.

    ``total`` (the byte count of ``bufs``, if the caller knows it) skips the
    bookkeeping when the first call sends everything, as it mostly does.
    """
    if total >= 0 and len(bufs) <= _MAX_IOV:
        sent = sock.sendmsg(bufs)
        if sent == total:
            return
        _consume(bufs, sent)
    while bufs:
        _consume(bufs, sock.sendmsg(bufs[:_MAX_IOV]))


def sendmsg_some(sock: socket.socket, bufs: list, total: int = -1) -> int:
    """Send what the socket takes now without blocking; return the byte count.

    ``total`` (the byte count of ``bufs``, if known) skips the bookkeeping when
    the first call sends everything.
    """
    sent = 0
    while bufs:
        try:
            n = sock.sendmsg(bufs[:_MAX_IOV] if len(bufs) > _MAX_IOV else bufs, [], socket.MSG_DONTWAIT)
        except BlockingIOError:
            break
        if n == total:
            bufs.clear()
            return n
        _consume(bufs, n)
        sent += n
        total = -1
    return sent


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` completely from a blocking ``sock``; raise ConnectionError on EOF."""
    got = 0
    n = view.nbytes
    while got < n:
        r = sock.recv_into(view[got:], n - got)
        if r == 0:
            raise ConnectionError("peer closed the connection")
        got += r


def recv_some(sock: socket.socket, views: list[memoryview], wait: bool = False) -> int:
    """Fill ``views`` with what has arrived, without blocking; return the byte count (0: nothing yet).

    With ``wait`` (on a socket set up by :func:`allow_waits`), wait in the kernel until every view is
    full or :data:`WAIT_LIMIT` passes: a payload that is on its way lands in one call, copied with the
    GIL released, instead of in many small receives each holding the GIL for its bookkeeping. The
    receive low-water mark must be the default then (the kernel wakes a waiting receive only at the
    mark, and a payload's tail is shorter than :data:`LOWAT`; ``wake_later(sock, (), lowat)`` resets it).
    Raises ConnectionError when the peer has closed the connection.
    """
    flags = socket.MSG_WAITALL if wait else socket.MSG_DONTWAIT
    try:
        if len(views) == 1:
            n = sock.recv_into(views[0], 0, flags)
            if n == views[0].nbytes:  # the usual case when the bytes are already here
                views.clear()
                return n
        else:
            n = sock.recvmsg_into(views[:_MAX_IOV], 0, flags)[0]
    except BlockingIOError:
        return 0
    if n == 0:
        raise ConnectionError("peer closed the connection")
    _consume(views, n)
    return n


def recv_some_into(sock: socket.socket, view: memoryview, got: int, need: int) -> int:
    """Receive what has arrived of ``view[got:need]`` without blocking; return the byte count (0: none yet).

    Raises ConnectionError when the peer has closed the connection.
    """
    try:
        n = sock.recv_into(view[got:], need - got, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return 0
    if n == 0:
        raise ConnectionError("peer closed the connection")
    return n


def wake_later(sock: socket.socket, views: list[memoryview] | tuple, lowat: int) -> int:
    """Set the socket's receive low-water mark for the payload still due into ``views``; return it.

    ``lowat`` is the mark now in force (0: the default). While :data:`LOWAT` bytes or more are due,
    poll wakes only when that many have arrived; as the rest shrinks below the mark it is lowered to
    what is due (never above it, or the last bytes would not wake anyone), and back to the default
    when nothing is due.
    """
    due = sum(v.nbytes for v in views) if views else 0
    if due >= LOWAT:
        want = LOWAT
    elif lowat:
        want = due
    else:
        return 0
    if want != lowat:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, want or 1)
    return want


class PayloadReceiver:
    """How one connection takes the payloads sent to it: the receive low-water mark in force (see
    :func:`wake_later`) and whether its payloads come at full speed, so that the rest of one may be waited
    for in the kernel (see :func:`recv_some`). Both ends of the TCP transport use one per connection."""

    __slots__ = ("lowat", "steady")

    def __init__(self) -> None:
        self.lowat = 0  # SO_RCVLOWAT in force while a large payload arrives
        self.steady = True  # no wait for the rest of a payload has run out on this connection

    def receive(self, sock: socket.socket, views: list[memoryview], may_wait: bool) -> tuple[int, bool]:
        """Receive what has arrived of the payload due into ``views``; return the byte count (0: nothing
        yet) and whether it waited. With ``may_wait``, while :data:`LOWAT` bytes or more are still due of a
        payload whose first bytes came (the mark is set), wait in the kernel for the rest, at most
        :data:`WAIT_LIMIT`; never again on this connection once such a wait ran out (its bytes are then
        read as they come). Raises ConnectionError when the peer has closed the connection."""
        wait = may_wait and self.steady and self.lowat == LOWAT
        if wait:
            self.lowat = wake_later(sock, (), self.lowat)
        n = recv_some(sock, views, wait)
        if wait and views:  # the wait ran out before the payload was in
            self.steady = False
        if n and (views or self.lowat):
            self.lowat = wake_later(sock, views, self.lowat)
        return n, wait
