"""Requests, their outcomes, and the batch that tracks a group of them.

A :class:`Batch` is filled in by transport threads and read by the user, with
``wait`` (blocking), ``poll`` (non-blocking) or ``await`` (asyncio).  A request
becomes final only when every slice of it has ended, so a caller who sees a
request FAILED or TIMEOUT knows no byte of it is still moving.
"""

from __future__ import annotations

import asyncio
import enum
import threading
import time
from dataclasses import dataclass
from typing import Callable, Generator, NamedTuple

from .errors import TransferError


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
        return self.state is State.COMPLETED


class Batch:
    """A group of submitted requests, completed by transports as their bytes land."""

    def __init__(self, requests: list[Request], deadline: float) -> None:
        n = len(requests)
        self.requests = requests
        self.deadline = deadline
        self._state = [State.PENDING] * n
        self._reason = [""] * n
        self._transport = [""] * n
        self._parts = [0] * n
        self._pending = n
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._callbacks: list[Callable[[], None]] = []
        self._expire: Callable[["Batch"], None] | None = None
        if n == 0:
            self._done.set()

    def __len__(self) -> int:
        return len(self.requests)

    # -- filled in by the engine and transports ---------------------------------

    def add_parts(self, index: int, count: int, transport: str) -> None:
        """Announce that request ``index`` travels as ``count`` slices over ``transport``."""
        with self._lock:
            self._parts[index] += count
            self._transport[index] = transport

    def part_done(self, index: int, state: State = State.COMPLETED, reason: str = "") -> None:
        """Record the end of one slice of request ``index``; the first failure wins."""
        with self._lock:
            if state is not State.COMPLETED and not self._reason[index]:
                self._reason[index] = reason
                self._state[index] = state  # provisional until every part has ended
            self._parts[index] -= 1
            if self._parts[index] > 0:
                return
            if self._state[index] is State.PENDING:
                self._state[index] = State.COMPLETED
            self._pending -= 1
            finished = self._pending == 0
        if finished:
            self._finish()

    def parts_completed(self, indices: list[int]) -> None:
        """Record the successful end of one slice of each request in ``indices`` (one lock round)."""
        finished = False
        with self._lock:
            parts, state = self._parts, self._state
            for index in indices:
                parts[index] -= 1
                if parts[index] == 0:
                    if state[index] is State.PENDING:
                        state[index] = State.COMPLETED
                    self._pending -= 1
                    finished = self._pending == 0
        if finished:
            self._finish()

    def fail(self, index: int, reason: str, state: State = State.FAILED) -> None:
        """End request ``index`` before any slice of it was sent."""
        with self._lock:
            if self._parts[index]:
                raise RuntimeError("fail() called on a request with slices in flight")
            self._parts[index] = 1
        self.part_done(index, state, reason)

    def _finish(self) -> None:
        self._done.set()
        with self._lock:
            callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            cb()

    # -- read by the user -------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def status(self, index: int) -> RequestStatus:
        with self._lock:
            state = self._state[index]
            if self._parts[index] > 0 and state is not State.PENDING:
                state = State.PENDING  # a failed slice, but others still moving
            return RequestStatus(state, self._reason[index], self._transport[index])

    def poll(self) -> list[RequestStatus]:
        """Current status of every request, without blocking."""
        return [self.status(i) for i in range(len(self.requests))]

    def wait(self, timeout: float | None = None) -> list[RequestStatus]:
        """Block until every request has ended; return their statuses.

        ``timeout`` (seconds) shortens the batch deadline: requests still
        moving then end TIMEOUT (their connections are torn down so no late
        byte lands). Without it, the deadline given at submit applies.
        """
        if timeout is not None:
            self.expire_at(time.monotonic() + timeout)
        while not self._done.wait(max(0.0, min(self.deadline - time.monotonic(), 1.0)) + 0.01):
            if time.monotonic() >= self.deadline and self._expire is not None:
                self._expire(self)
        return self.poll()

    def expire_at(self, deadline: float) -> None:
        """Move the deadline earlier (never later)."""
        if deadline < self.deadline:
            self.deadline = deadline

    def check(self) -> None:
        """Wait, then raise :class:`TransferError` if any request did not complete."""
        statuses = self.wait()
        bad = [(i, s) for i, s in enumerate(statuses) if not s.ok]
        if bad:
            i, s = bad[0]
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise TransferError(f"request {i} {s.state.name}: {s.reason}{more}", statuses)

    def add_done_callback(self, cb: Callable[[], None]) -> None:
        """Call ``cb`` (from a transport thread) once every request has ended."""
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(cb)
                return
        cb()

    def __await__(self) -> Generator[object, None, list[RequestStatus]]:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def wake() -> None:
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(None))

        self.add_done_callback(wake)
        left = self.deadline - time.monotonic()
        handle = loop.call_later(max(left, 0) + 0.05, lambda: self._expire and self._expire(self))
        try:
            yield from fut.__await__()
        finally:
            handle.cancel()
        return self.poll()
