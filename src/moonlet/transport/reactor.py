"""A listening socket served by one poll() thread: what moonlet's TCP target and its Mooncake data port share.

After traffic the thread polls without sleeping for ``spin_us`` microseconds
before it blocks (on virtual machines a sleep/wake-up pair costs more than a
small transfer).  Subclasses say what a connection is (:meth:`_admit`), how to
turn one away (:meth:`_refuse`), what to do when it is ready
(:meth:`_serve`) and how to let it go (:meth:`_drop`, which calls
:meth:`_forget`); :meth:`_tick` runs once per loop turn for timeouts.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from typing import Any

log = logging.getLogger("moonlet")

POLLIN = select.POLLIN


class Reactor:
    """``listener`` (bound and listening) plus the thread serving every connection accepted on it."""

    def __init__(self, listener: socket.socket, spin_us: int, max_connections: int, name: str) -> None:
        """Call :meth:`start` once the subclass is ready to serve."""
        listener.setblocking(False)
        self._sock = listener
        self._spin = spin_us / 1e6
        self._max_conns = max_connections
        self._conns: dict[int, Any] = {}  # fd -> connection (anything with an ``fd``)
        self._poll = select.poll()
        self._poll.register(listener.fileno(), POLLIN)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._poll.register(self._wake_r, POLLIN)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop serving: close the listener and every connection, and join the thread."""
        self._closed = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        self._thread.join(timeout=5)
        os.close(self._wake_w)

    # -- what subclasses provide -----------------------------------------------------------

    def _admit(self, sock: socket.socket) -> Any:
        """The connection object for a freshly accepted ``sock``."""
        raise NotImplementedError

    def _refuse(self, sock: socket.socket) -> None:
        """``sock`` arrived while ``max_connections`` are held; it is closed after this."""

    def _serve(self, conn: Any, events: int) -> None:
        """``conn`` is ready (``events`` from poll); handle its errors, dropping it if it cannot go on."""
        raise NotImplementedError

    def _drop(self, conn: Any) -> None:
        """End ``conn``: :meth:`_forget` it, release what it holds, close its socket."""
        raise NotImplementedError

    def _tick(self, now: float) -> None:
        """Once per loop turn, busy or idle (timeouts)."""

    # -- the loop ----------------------------------------------------------------------------

    def _forget(self, conn: Any) -> bool:
        """Stop watching ``conn`` (its socket stays open); False if it was not watched."""
        if self._conns.pop(conn.fd, None) is None:
            return False
        try:
            self._poll.unregister(conn.fd)
        except (KeyError, ValueError):
            pass
        return True

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # e.g. out of file descriptors: keep serving the others
                log.warning("%s: accept failed: %s", self._thread.name, e)
                return
            if len(self._conns) >= self._max_conns:
                self._refuse(sock)
                sock.close()
                continue
            conn = self._admit(sock)
            self._conns[conn.fd] = conn
            self._poll.register(conn.fd, POLLIN)

    def _run(self) -> None:
        poll = self._poll.poll
        listener = self._sock.fileno()
        last = 0.0
        try:
            while not self._closed:
                events = poll(0)
                if not events:
                    if time.monotonic() - last < self._spin:
                        continue
                    events = poll(1000)
                for fd, ev in events:
                    conn = self._conns.get(fd)
                    if conn is not None:
                        self._serve(conn, ev)
                    elif fd == self._wake_r:
                        try:
                            os.read(self._wake_r, 64)
                        except BlockingIOError:
                            pass
                    elif fd == listener:
                        self._accept()
                now = time.monotonic()
                self._tick(now)  # after serving: timeouts are not on any request's path
                if events:
                    last = now
        finally:
            for conn in list(self._conns.values()):
                self._drop(conn)
            self._sock.close()
            os.close(self._wake_r)
