"""Requests, their outcomes, and the batch that tracks a group of them.

A :class:`Batch` is filled in by transport threads and read by the user, with
``wait`` (blocking), ``poll`` (non-blocking) or ``await`` (asyncio).  A request
becomes final only when every slice of it has ended, so a caller who sees a
request FAILED or TIMEOUT knows no byte of it is still moving.

While a batch runs, the engine pins the local buffers it uses (so that
``unregister`` waits for it); the batch hands them back exactly once, when it
ends, whichever way it ends.
"""

from __future__ import annotations

import asyncio
import enum
import threading
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from .config import check_timeout
from .errors import TransferError

if TYPE_CHECKING:
    from .memory import Buffer


class Op(enum.IntEnum):
    """Direction of a request, seen from the initiator."""

    READ = 0
    WRITE = 1


class State(enum.IntEnum):
    """Lifecycle of one request."""

    PENDING = 0
    COMPLETED = 1
    FAILED = 2
    TIMEOUT = 3


class Request(NamedTuple):
    """One transfer: ``op`` between ``[local_addr, +length)`` here and ``[remote_addr, +length)`` in ``segment``."""

    op: Op
    local_addr: int
    segment: object
    remote_addr: int
    length: int


@dataclass(frozen=True)
class RequestStatus:
    """Outcome of one request: its state, why it failed, and which transport carried it."""

    state: State
    reason: str = ""
    transport: str = ""

    @property
    def ok(self) -> bool:
        """Whether the request completed."""
        return self.state is State.COMPLETED


_COMPLETED: dict[str, RequestStatus] = {}


def _completed(transport: str) -> RequestStatus:
    """A shared COMPLETED status per transport (statuses are immutable)."""
    status = _COMPLETED.get(transport)
    if status is None:
        status = _COMPLETED[transport] = RequestStatus(State.COMPLETED, "", transport)
    return status


class Batch:
    """A group of submitted requests, completed by transports as their bytes land."""

    # Defaults read until first set, so a batch costs few stores to make (one is made per submit).
    _cond: threading.Condition | None = None  # made by the first thread that must block (_block)
    _failed = False  # some part ended other than COMPLETED
    _uniform: str | None = None  # the transport of every request, when one carries them all
    # Per request: state, first failure reason, transport, parts still moving. Made on first need
    # (_lists): a batch carried whole by one transport, one part a request, and completed in one go
    # (an array submit answered by one reply) never needs them.
    _state: list[State] = None  # type: ignore[assignment]
    _reason: list[str] = None  # type: ignore[assignment]
    _transport: list[str] = None  # type: ignore[assignment]
    _parts: list[int] = None  # type: ignore[assignment]
    #: what the engine pinned for the batch's life (its distinct local buffers), and who unpins them
    pinned: Sequence[Buffer] = ()
    _unpin: Callable[[Batch], None] | None = None
    #: with metrics on: (op of every request or None when they differ, their lengths or None, submit time)
    meter: tuple[Op | None, list[int] | None, float] = (None, None, 0.0)

    def __init__(self, requests: list[Request] | int, deadline: float,
                 expire: Callable[[Batch], None] | None = None,
                 driver: Callable[[Batch, bool], None] | None = None) -> None:
        """``requests``: the requests, or their count when submitted in array form. ``expire``: called
        when a waiter finds the deadline passed, to tear down what is still moving. ``driver``: the first
        of :meth:`add_driver`, when the submitter knows it already."""
        self.requests: list[Request] | None  # None for an array submit
        if isinstance(requests, int):
            n, self.requests = requests, None
        else:
            n, self.requests = len(requests), requests
        self._n = self._pending = n
        self.deadline = deadline
        self._expire = expire
        self._lock = threading.Lock()
        #: whether every request has ended (read-only to users). Set under _lock; a thread that must
        #: block waits on _cond. The common waiter drives its batch to the end itself and never blocks.
        #: A plain attribute: drivers test it on every turn of their loop.
        self.done = n == 0
        self._drivers: list[Callable[[Batch, bool], None]] = [driver] if driver is not None else []

    def __len__(self) -> int:
        return self._n

    def _lists(self) -> None:
        """Make the per-request lists (holding ``_lock``). Before, either nothing is announced or every
        request has one part on ``_uniform``, all still moving (a uniform batch ends all at once)."""
        if self._parts is None:
            n, uniform = self._n, self._uniform
            self._state = [State.PENDING] * n
            self._reason = [""] * n
            self._transport = [uniform or ""] * n
            self._parts = [1 if uniform is not None else 0] * n

    # -- filled in by the engine and transports ---------------------------------

    def add_parts(self, counts: list[tuple[int, int]], transport: str) -> None:
        """Announce that each request ``index`` of ``(index, count)`` travels as ``count`` slices over ``transport``."""
        with self._lock:
            if self.done:  # ended by :meth:`end_all` (the engine closed) while being submitted
                return
            self._lists()
            parts, names = self._parts, self._transport
            for index, count in counts:
                parts[index] += count
                names[index] = transport

    def add_parts_all(self, transport: str) -> None:
        """Announce that every request travels as one part over ``transport`` (array submits, before
        anything else is announced, and so before any other thread can see the batch: no lock)."""
        if self._parts is not None:
            raise RuntimeError("add_parts_all on a batch that already has parts announced")
        self._uniform = transport

    def hold(self, pinned: Sequence[Buffer], unpin: Callable[[Batch], None]) -> None:
        """Keep ``pinned`` until the batch ends, then call ``unpin(batch)`` once (set by the engine at
        submit, before any transport sees the batch)."""
        self.pinned = pinned
        self._unpin = unpin

    def add_driver(self, drive: Callable[[Batch, bool], None]) -> None:
        """Have waiters call ``drive`` to make progress (once per transport; :meth:`wait` also runs drivers
        added while it waits)."""
        if drive not in self._drivers:
            self._drivers.append(drive)

    def set_transport(self, indices: list[int], transport: str) -> None:
        """Record that requests ``indices`` moved to another transport (a fallback)."""
        with self._lock:
            self._lists()
            self._uniform = None
            for index in indices:
                self._transport[index] = transport

    def part_done(self, index: int, state: State = State.COMPLETED, reason: str = "") -> None:
        """Record the end of one slice of request ``index``; the first failure wins."""
        with self._lock:
            if self.done:  # ended by :meth:`end_all`: a late report changes nothing
                return
            self._lists()
            if state is not State.COMPLETED and not self._reason[index]:
                self._reason[index] = reason
                self._state[index] = state  # provisional until every part has ended
                self._failed = True
            self._parts[index] -= 1
            if self._parts[index] > 0:
                return
            if self._state[index] is State.PENDING:
                self._state[index] = State.COMPLETED
            self._pending -= 1
            if self._pending == 0:
                self._finish_locked()

    def parts_completed(self, indices: Sequence[int]) -> None:
        """Record the successful end of one slice of each request in ``indices`` (one lock round)."""
        with self._lock:
            if self.done:  # ended by :meth:`end_all`
                return
            if self._parts is None and len(indices) == self._pending == self._n:
                # A uniform batch, every request in this one reply: the common case of submit_many.
                self._pending = 0
                self._finish_locked()
                return
            self._lists()
            parts, state = self._parts, self._state
            for index in indices:
                parts[index] -= 1
                if parts[index] == 0:
                    if state[index] is State.PENDING:
                        state[index] = State.COMPLETED
                    self._pending -= 1
                    if self._pending == 0:
                        self._finish_locked()

    def fail(self, index: int, reason: str, state: State = State.FAILED) -> None:
        """End request ``index`` before any slice of it was sent."""
        with self._lock:
            if self.done:
                return
            self._lists()
            self._parts[index] += 1
        self.part_done(index, state, reason)

    def end_all(self, state: State, reason: str) -> None:
        """End every request still moving as ``state`` with ``reason`` (those that failed already keep their
        first reason), at once. For the engine's close, once its transports have stopped: the caller makes
        sure no transport touches the batch's memory any more; reports that still come are ignored."""
        with self._lock:
            if self.done:
                return
            self._lists()
            for index in range(self._n):
                self._parts[index] = 0
                if self._state[index] is State.PENDING:
                    self._state[index] = state
                    self._reason[index] = reason
            self._failed = True
            self._pending = 0
            self._finish_locked()

    def _finish_locked(self) -> None:
        """Every request has ended (called holding ``_lock``, once): unpin, then wake blocked waiters."""
        self.done = True
        if self._unpin is not None:
            self._unpin(self)
            self._unpin = None
        if self._cond is not None:
            self._cond.notify_all()

    def carried_whole_by(self) -> str | None:
        """For an ended batch: the transport that completed every request, when one did it all (the usual
        case); else None. Takes no lock: the engine's unpin callback calls it holding the batch's lock."""
        if self._failed:
            return None
        if self._parts is None or self._uniform is not None:
            return self._uniform
        first = self._transport[0] if self._n else ""
        return first if first and self._transport.count(first) == self._n else None

    def ended_requests(self) -> list[tuple[State, str]]:
        """For an ended batch: (state, transport) of every request. Takes no lock (as above)."""
        if self._parts is None:
            return [(State.COMPLETED, self._uniform or "")] * self._n
        return list(zip(self._state, self._transport))

    # -- read by the user -------------------------------------------------------

    def status(self, index: int) -> RequestStatus:
        """Status of request ``index`` now."""
        with self._lock:
            if self._parts is None:  # uniform: all moving or all completed
                if not 0 <= index < self._n and not -self._n <= index < 0:
                    raise IndexError(f"batch has {self._n} requests, no request {index}")
                if self.done:
                    return _completed(self._uniform or "")
                return RequestStatus(State.PENDING, "", self._uniform or "")
            state = self._state[index]
            if self._parts[index] > 0 and state is not State.PENDING:
                state = State.PENDING  # a failed slice, but others still moving
            return RequestStatus(state, self._reason[index], self._transport[index])

    def statuses(self) -> list[RequestStatus]:
        """Status of every request now (no progress is made)."""
        if self.done and self._parts is None:  # uniform and all completed: final, no lock needed
            return [_completed(self._uniform or "")] * self._n
        with self._lock:
            if self._parts is None:  # uniform: all moving or all completed
                if self.done:
                    return [_completed(self._uniform or "")] * self._n
                return [RequestStatus(State.PENDING, "", self._uniform or "")] * self._n
            if self.done and not self._failed:  # all completed: shared status objects
                if self._uniform is not None:
                    return [_completed(self._uniform)] * self._n
                return [_COMPLETED.get(t) or _completed(t) for t in self._transport]
            out = []
            for state, reason, transport, parts in zip(self._state, self._reason, self._transport, self._parts):
                if parts > 0:
                    state = State.PENDING
                if state is State.COMPLETED:
                    out.append(_completed(transport))
                else:
                    out.append(RequestStatus(state, reason, transport))
            return out

    def poll(self) -> list[RequestStatus]:
        """Make what progress is possible without blocking; return every request's status."""
        for drive in self._drivers:
            drive(self, False)
        return self.statuses()

    def wait(self, timeout: float | None = None) -> list[RequestStatus]:
        """Block until every request has ended; return their statuses.

        ``timeout`` (seconds, finite, in (0, ``config.MAX_TIMEOUT``]) shortens
        the batch deadline: requests still moving then end TIMEOUT (their
        connections are torn down so no late byte lands). Without it (None),
        the deadline given at submit applies.
        """
        if timeout is not None:
            timeout = check_timeout("timeout", timeout)
        if self.done:  # ended already (a copy made at submit, or a quick reply): no driver to run
            return self.statuses()
        if timeout is not None:
            self.expire_at(time.monotonic() + timeout)
        ran = 0
        while True:
            while ran < len(self._drivers):  # a transport may hand requests to another one meanwhile
                self._drivers[ran](self, True)
                ran += 1
            if self.done or self._block(max(0.0, min(self.deadline - time.monotonic(), 0.1)) + 0.01):
                break
            if time.monotonic() >= self.deadline and self._expire is not None:
                self._expire(self)
        return self.statuses()

    def _block(self, timeout: float) -> bool:
        """Sleep until the batch ends or ``timeout`` passes; whether it ended."""
        with self._lock:
            if not self.done:
                if self._cond is None:
                    self._cond = threading.Condition(self._lock)
                self._cond.wait(timeout)
            return self.done

    def expire_at(self, deadline: float) -> None:
        """Move the deadline earlier (never later)."""
        if deadline < self.deadline:
            self.deadline = deadline

    def check(self) -> list[RequestStatus]:
        """Wait, then return the statuses (every one COMPLETED, with the transport that carried it), or
        raise :class:`TransferError` (holding them all) if any request did not complete."""
        statuses = self.wait()
        bad = [(i, s) for i, s in enumerate(statuses) if not s.ok]
        if bad:
            i, s = bad[0]
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise TransferError(f"request {i} {s.state.name}: {s.reason}{more}", statuses)
        return statuses

    def __await__(self) -> Generator[object, None, list[RequestStatus]]:
        """``await batch``: waits in a worker thread, so the event loop never blocks."""
        loop = asyncio.get_running_loop()
        return (yield from loop.run_in_executor(None, self.wait).__await__())
