"""Scatter-gather socket helpers: move bytes between sockets and memoryviews without copies in Python."""

from __future__ import annotations

import socket

# Linux caps one sendmsg/recvmsg at 1024 iovecs; stay well below.
_MAX_IOV = 512


def send_all(sock: socket.socket, bufs: list) -> None:
    """Send every buffer in ``bufs`` in order with as few ``sendmsg`` calls as the kernel allows."""
    i = 0
    n = len(bufs)
    while i < n:
        chunk = bufs[i : i + _MAX_IOV]
        sent = sock.sendmsg(chunk)
        # Skip the buffers sent whole; resume inside the first partial one.
        for b in chunk:
            size = len(b) if not isinstance(b, memoryview) else b.nbytes
            if sent >= size:
                sent -= size
                i += 1
            else:
                if sent:
                    bufs[i] = memoryview(b)[sent:]
                break


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` completely from ``sock``; raise ConnectionError on EOF."""
    got = 0
    n = view.nbytes
    while got < n:
        r = sock.recv_into(view[got:], n - got)
        if r == 0:
            raise ConnectionError("peer closed the connection")
        got += r


def recv_views(sock: socket.socket, views: list[memoryview]) -> None:
    """Fill every view in ``views`` in order, with ``recvmsg_into`` over many buffers at once."""
    if len(views) == 1:
        recv_exact(sock, views[0])
        return
    i = 0
    n = len(views)
    while i < n:
        chunk = views[i : i + _MAX_IOV]
        r = sock.recvmsg_into(chunk)[0]
        if r == 0:
            raise ConnectionError("peer closed the connection")
        for v in chunk:
            size = v.nbytes
            if r >= size:
                r -= size
                i += 1
            else:
                if r:
                    views[i] = v[r:]
                break
