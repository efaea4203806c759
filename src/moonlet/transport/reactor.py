"""Connections served by one poll() thread: what moonlet's TCP target and its Mooncake data port share.

A reactor either owns a listening socket and accepts on it, or is handed
connections that another reactor accepted (:meth:`Reactor.hand`): a target
spreads its peers over several reactors, one thread each.  After traffic the
thread polls without sleeping for a while before it blocks (on virtual
machines a sleep/wake-up pair costs more than a small transfer); how long
adapts to what it buys (:class:`~.spin.Spinner`).  Subclasses say what a connection is (:meth:`_admit`), whether
a newcomer may have one (:meth:`_make_room`), how to turn one away
(:meth:`_refuse`), what to do when it is ready (:meth:`_serve`) and how to let
it go (:meth:`_drop`, which calls :meth:`_forget`); :meth:`_tick` runs once per
loop turn for timeouts.

One thread serves every peer, so nothing a peer sends may end it: an exception
that escapes :meth:`_serve` (a bug) costs only the connection it came from.
When accepting fails (out of file descriptors, say) the listener is left alone
for a while, 50 ms doubling up to 1 s, instead of being polled in a busy loop.
A reactor that dies anyway says so loudly and keeps the reason in
:attr:`Reactor.failure` for its owner to check.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import threading
import time
from collections import deque
from typing import Any

from .spin import Spinner

log = logging.getLogger("moonlet")

POLLIN = select.POLLIN

_PAUSE_MIN, _PAUSE_MAX = 0.05, 1.0  # seconds the listener rests after accept() failed, doubling
_ACCEPTS_PER_TURN = 64  # connections accepted in one go before the others are served again
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class Reactor:
    """``listener`` (bound and listening; or None: connections come by :meth:`hand`) plus the thread serving
    every connection accepted on it or handed to it."""

    def __init__(self, listener: socket.socket | None, spin_us: int, max_connections: int, name: str) -> None:
        """Call :meth:`start` once the subclass is ready to serve."""
        self._sock = listener
        self._spinner = Spinner(spin_us)
        self._max_conns = max_connections
        self._conns: dict[int, Any] = {}  # fd -> connection (anything with an ``fd``)
        self._poll = select.poll()
        if listener is not None:
            listener.setblocking(False)
            self._poll.register(listener.fileno(), POLLIN)
        #: connections handed over by another reactor's thread, not yet watched by this one (see hand)
        self._inbox: deque[Any] = deque()
        self._inbox_lock = threading.Lock()
        self._gone = False  # the thread has left and dropped what it held: hand() refuses
        self._pipe_open = True  # the write end of the wake-up pipe (closed by close(), under _inbox_lock)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._poll.register(self._wake_r, POLLIN)
        self._closed = False
        #: the longest an idle loop turn blocks in poll(), ms (a subclass whose timeouts are short lowers it)
        self._wait_ms = 1000
        self._pause = 0.0  # seconds the listener rests after the last failed accept(); 0: accepting
        self._resume_at = 0.0  # when it is polled again (monotonic), while resting
        #: why the serving thread died (None while it serves, or after a clean close): once set, nothing
        #: is served any more
        self.failure: str | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def load(self) -> int:
        """Connections this reactor serves or is about to (read from any thread)."""
        return len(self._conns) + len(self._inbox)

    def hand(self, conn: Any) -> bool:
        """From another thread: serve ``conn`` (no other thread touches it any more) from this reactor's
        thread, with :meth:`_adopt`; False if this reactor has stopped (the caller still owns ``conn``)."""
        with self._inbox_lock:
            if self._gone:
                return False
            self._inbox.append(conn)
        self._wake()
        return True

    def close(self) -> None:
        """Stop serving: close the listener and every connection, and join the thread."""
        self._closed = True
        self._wake()
        self._thread.join(timeout=5)
        if self._thread.is_alive():
            log.warning("%s: still running 5 s after close; its wake-up pipe stays open", self._thread.name)
            return
        with self._inbox_lock:  # no wake-up is written to the fd once it is closed (see _wake)
            self._pipe_open = False
            os.close(self._wake_w)

    def _wake(self) -> None:
        """Wake the thread out of poll (from any thread; a no-op once the pipe is closed)."""
        with self._inbox_lock:
            if not self._pipe_open:
                return
            try:
                os.write(self._wake_w, b"x")
            except OSError:  # full: a wake-up is pending anyway
                pass

    # -- what subclasses provide -----------------------------------------------------------

    def _admit(self, sock: socket.socket) -> Any:
        """The connection object for a freshly accepted ``sock``."""
        raise NotImplementedError

    def _make_room(self) -> bool:
        """Whether a newcomer may be admitted now (a subclass may drop another connection to make room)."""
        return len(self._conns) < self._max_conns

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

    def _adopt(self, conn: Any) -> None:
        """Start watching ``conn``, handed over by another reactor (see :meth:`hand`)."""
        self._conns[conn.fd] = conn
        self._poll.register(conn.fd, POLLIN)

    def _take_inbox(self) -> None:
        while self._inbox:
            conn = self._inbox[0]  # watched before it leaves the inbox: load never misses it
            try:
                self._adopt(conn)
            except Exception:  # noqa: BLE001 - see _fault
                self._conns[conn.fd] = conn
                self._fault(conn)
            self._inbox.popleft()

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
        assert self._sock is not None
        for _ in range(_ACCEPTS_PER_TURN):
            try:
                sock, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:  # the peer gave up while queued
                continue
            except OSError as e:  # e.g. out of file descriptors: rest, and keep serving the others
                self._rest(e)
                return
            if self._pause:
                log.info("%s: accepting connections again", self._thread.name)
                self._pause = 0.0
            if not self._make_room():
                self._refuse(sock)
                sock.close()
                continue
            try:
                conn = self._admit(sock)
            except Exception as e:  # noqa: BLE001 - one newcomer's setup failing must not end the thread
                sock.close()
                if isinstance(e, OSError) and e.errno in _OUT_OF_RESOURCES:  # e.g. no fd for a TLS relay
                    self._rest(e)
                    return
                log.warning("%s: setting up an accepted connection failed: %r", self._thread.name, e)
                continue
            self._conns[conn.fd] = conn
            self._poll.register(conn.fd, POLLIN)

    def _rest(self, error: OSError) -> None:
        """accept() failed: stop polling the listener for a while (50 ms, doubling to 1 s while it keeps
        failing), warning once per episode, so a listener that stays readable cannot spin the thread."""
        if not self._pause:
            log.warning("%s: cannot accept connections (%s); retrying every %g to %g s until it works",
                        self._thread.name, error, _PAUSE_MIN, _PAUSE_MAX)
        self._pause = min(self._pause * 2, _PAUSE_MAX) if self._pause else _PAUSE_MIN
        self._resume_at = time.monotonic() + self._pause
        try:
            self._poll.unregister(self._sock.fileno())  # type: ignore[union-attr]
        except (KeyError, ValueError):
            pass

    def _resume(self) -> None:
        """The rest is over: poll the listener again."""
        assert self._sock is not None
        self._resume_at = 0.0
        self._poll.register(self._sock.fileno(), POLLIN)

    def _fault(self, conn: Any) -> None:
        """Serving ``conn`` raised (a bug, never a peer's doing): log it and end that connection only."""
        log.error("%s: serving a connection failed; dropping it", self._thread.name, exc_info=True)
        try:
            self._drop(conn)
        except Exception:  # noqa: BLE001 - at least stop watching it
            log.error("%s: dropping that connection failed too", self._thread.name, exc_info=True)
            self._forget(conn)

    def _run(self) -> None:
        poll = self._poll.poll
        listener = self._sock.fileno() if self._sock is not None else -1
        spinner = self._spinner
        last = 0.0  # when the last traffic came
        spin = 0.0  # how long to spin after it
        try:
            while not self._closed:
                events = poll(0)
                if not events:
                    if time.monotonic() - last < spin:
                        continue
                    if spin:
                        spinner.wasted()
                        spin = 0.0
                    wait = self._wait_ms
                    if self._resume_at:
                        wait = max(1, min(wait, int((self._resume_at - time.monotonic()) * 1000) + 1))
                    events = poll(wait)
                    if events and last:
                        spinner.woke(time.monotonic() - last)
                for fd, ev in events:
                    conn = self._conns.get(fd)
                    if conn is not None:
                        try:
                            self._serve(conn, ev)
                        except Exception:  # noqa: BLE001 - see _fault
                            self._fault(conn)
                    elif fd == self._wake_r:
                        try:
                            os.read(self._wake_r, 64)
                        except BlockingIOError:
                            pass
                        self._take_inbox()
                    elif fd == listener:
                        self._accept()
                now = time.monotonic()
                self._tick(now)  # after serving: timeouts are not on any request's path
                if self._resume_at and now >= self._resume_at:
                    self._resume()
                if events:
                    last = now
                    spin = spinner.after_traffic(now)
        except BaseException as e:  # noqa: BLE001 - a bug: say so loudly, and leave the reason for the owner
            self.failure = f"{self._thread.name} stopped serving: {type(e).__name__}: {e}"
            log.critical("%s; every connection is dropped and the listener closed", self.failure, exc_info=True)
        finally:
            spinner.release()
            with self._inbox_lock:
                self._gone = True
            for conn in self._inbox:  # watched by nobody yet: _drop ends only what it finds watched
                self._conns[conn.fd] = conn
            self._inbox.clear()
            for conn in list(self._conns.values()):
                try:
                    self._drop(conn)
                except Exception:  # noqa: BLE001 - close the rest regardless
                    log.error("%s: dropping a connection on the way out failed", self._thread.name,
                              exc_info=True)
            if self._sock is not None:
                self._sock.close()
            os.close(self._wake_r)
