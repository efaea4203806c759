"""Adaptive busy-polling: how long a thread waiting for traffic polls without sleeping before it blocks.

A sleep/wake-up pair costs tens of microseconds on virtual machines, more than
a small transfer, so after traffic a waiting thread (a target's reactor, an
initiator's reply driver) polls for up to ``spin_us`` first. Spinning pays only
when the next message comes within that window and when the CPU it burns is
not one that the peer needs: on a machine with more runnable threads than
CPUs a spinning thread delays the very reply it waits for by a scheduler time
slice (milliseconds). So a :class:`Spinner`

- halves its window each time it spins in full and nothing comes (down to
  none), and each time a blocking wait ends sooner than ``spin_us`` after the
  last traffic (spinning would have paid) widens it again, to twice what it
  was or twice that gap, whichever is more (up to ``spin_us``): doubling
  alone from none would restart at a window shorter than the gap between
  replies, waste it, and halve back to none, never catching up;
- spins only while it holds the process's spin slot: of a target's many
  reactors one spins at a time (a spinning thread holds the GIL most of the
  time, which the others need to do their work);
- does not spin while the machine is oversubscribed: every 5 ms of spinning
  the thread looks at how long it waited for a CPU meanwhile (the run delay
  the kernel keeps per thread, ``/proc/thread-self/schedstat``); a quarter of
  that time or more, four looks running, means runnable threads outnumber
  CPUs (a busy process beside it finds a third or more at most looks; the
  engine's own threads on a 2-CPU machine find that much at a few looks in a
  hundred, never four running), and then no thread of the process spins for
  half a second.
"""

from __future__ import annotations

import os
import threading

_LOOK_EVERY = 0.005  # seconds of spinning between looks at the thread's run delay
_CONTENDED = 0.25  # waiting for a CPU this share of the time since the last look: oversubscribed
_LOOKS = 4  # consecutive looks that must find it so (a thread waking for a moment is not contention)
_BACK_OFF = 0.5  # after that, no thread of the process spins for this long
_FLOOR = 20e-6  # the smallest window worth spinning; below it the window is 0
_SCHEDSTAT = "/proc/thread-self/schedstat"  # "<ns on a CPU> <ns waiting for one> <time slices>"


_schedstat = True  # False once the kernel turned out not to keep it (no CONFIG_SCHED_INFO, not Linux)


def _run_delay() -> float | None:
    """Seconds the calling thread has waited, runnable, for a CPU; None where the kernel does not say."""
    global _schedstat
    if not _schedstat:
        return None
    try:
        fd = os.open(_SCHEDSTAT, os.O_RDONLY)
    except OSError:
        _schedstat = False
        return None
    try:
        return int(os.read(fd, 128).split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return None
    finally:
        os.close(fd)


class _Process:
    """What every spinner of this process shares: the spin slots, and whether spinning is backed off."""

    def __init__(self) -> None:
        self.quiet_until = 0.0  # monotonic time until which no thread spins
        self._slots = 1  # threads that may spin at once
        self._lock = threading.Lock()

    def take_slot(self) -> bool:
        with self._lock:
            if not self._slots:
                return False
            self._slots -= 1
            return True

    def give_slot(self) -> None:
        with self._lock:
            self._slots += 1


PROCESS = _Process()


class Spinner:
    """The spin window of one waiting thread (used by one thread at a time: a reactor, or whichever thread
    holds an initiator's driver role, which calls :meth:`release` as it leaves)."""

    __slots__ = ("limit", "window", "_slot", "_look_at", "_delay", "_ident", "_seen")

    def __init__(self, spin_us: int) -> None:
        self.limit = spin_us / 1e6  # the configured most (EngineConfig.spin_us)
        self.window = self.limit  # what spinning has been worth lately
        self._slot = False  # holds one of the process's spin slots
        self._look_at = 0.0  # when the run delay was last read (0: never; time blocked in between counts too)
        self._delay = 0.0  # ... and what it was
        self._ident = 0  # ... by which thread
        self._seen = 0  # consecutive looks that found the thread waiting for a CPU

    def after_traffic(self, now: float) -> float:
        """How long to spin from ``now``, right after traffic (0: block at once)."""
        if not self.window or now < PROCESS.quiet_until or self._contended(now):
            self.release()
            return 0.0
        if not self._slot:
            self._slot = PROCESS.take_slot()
            if not self._slot:
                return 0.0
        return self.window

    def _contended(self, now: float) -> bool:
        """Whether this thread waited for a CPU for a good share of the time it spun lately."""
        if self._look_at and now - self._look_at < _LOOK_EVERY:
            return False
        delay = _run_delay()
        if delay is None:
            return False
        was, since, by = self._delay, self._look_at, self._ident
        self._delay, self._look_at, self._ident = delay, now, threading.get_ident()
        if not since or by != self._ident:  # the first look of this spell, or of another thread
            return False
        self._seen = self._seen + 1 if delay - was >= _CONTENDED * (now - since) else 0
        if self._seen >= _LOOKS:
            self._seen = 0
            PROCESS.quiet_until = now + _BACK_OFF
            return True
        return False

    def wasted(self) -> None:
        """Spun the whole window and nothing came: the thread blocks now."""
        self.window = self.window / 2 if self.window >= 2 * _FLOOR else 0.0
        self.release()

    def release(self) -> None:
        """The thread blocks or leaves: give its spin slot back."""
        if self._slot:
            self._slot = False
            PROCESS.give_slot()

    def woke(self, since_traffic: float) -> None:
        """A blocking wait ended with traffic ``since_traffic`` seconds after the last: had that been within
        the limit, spinning would have caught it."""
        if since_traffic < self.limit:
            self.window = min(self.limit, max(2 * self.window, 2 * since_traffic, _FLOOR))
