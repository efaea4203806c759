"""Registered memory: buffers, their locations, and the registry that guards them.

Only ranges inside a registered buffer may be touched by a transfer, local or
remote.  The registry answers "which buffer holds [addr, addr+len)" with a
bisect over sorted start addresses, and pins buffers while a transfer uses
them so that ``unregister`` never returns while bytes are still moving into
memory the caller is about to free.
"""

from __future__ import annotations

import bisect
import ctypes
import fcntl
import mmap
import os
import platform
import re
import stat
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import MemoryAccessError, RegistrationError

if TYPE_CHECKING:
    from .segment import SegmentDescriptor

_LOCATION_RE = re.compile(r"^(cpu|cuda):(\d+)$")
_ADDR_LIMIT = 1 << 64


def parse_location(location: str) -> tuple[str, int]:
    """Split ``"cpu:0"`` / ``"cuda:1"`` into ``("cpu", 0)``; raise on anything else."""
    m = _LOCATION_RE.match(location or "")
    if not m:
        raise RegistrationError(f"location must look like 'cpu:N' or 'cuda:N', got {location!r}")
    return m.group(1), int(m.group(2))


def view_at(addr: int, length: int) -> memoryview:
    """A writable byte memoryview over raw host memory at ``addr``.

    No copy is made; the caller guarantees the memory stays valid.
    """
    return memoryview((ctypes.c_char * length).from_address(addr)).cast("B")


def address_of(obj: Any) -> tuple[int, int, Any]:
    """Return ``(address, length, keepalive)`` of a buffer-protocol object.

    ``keepalive`` must be held for as long as the address is used: for a
    bytearray it also prevents a resize that would move the memory.
    """
    try:
        mv = memoryview(obj)
    except TypeError:
        raise RegistrationError(
            f"cannot register {type(obj).__name__}: pass an address and length, "
            "or an object exposing the buffer protocol (bytearray, numpy array, mmap)"
        ) from None
    if not mv.contiguous:
        raise RegistrationError("cannot register a non-contiguous buffer; make it contiguous first")
    if mv.readonly:
        raise RegistrationError(
            f"cannot register read-only {type(obj).__name__}: moonlet needs writable memory "
            "(use bytearray, a writable numpy array or mmap)"
        )
    mv = mv.cast("B")
    if mv.nbytes == 0:
        raise RegistrationError("cannot register an empty buffer (length 0)")
    anchor = ctypes.c_char.from_buffer(mv)
    return ctypes.addressof(anchor), mv.nbytes, (mv, anchor)


_MOVE_PAGES = {"x86_64": 279, "aarch64": 239}


def _numa_nodes() -> list[int]:
    try:
        names = os.listdir("/sys/devices/system/node")
    except OSError:
        return [0]
    nodes = sorted(int(n[4:]) for n in names if n.startswith("node") and n[4:].isdigit())
    return nodes or [0]


def host_numa_node(addr: int) -> int:
    """NUMA node that holds the page at ``addr`` (0 on single-node hosts or when unknown)."""
    if len(_numa_nodes()) <= 1:
        return 0
    nr = _MOVE_PAGES.get(platform.machine())
    if nr is None:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    page = ctypes.c_void_p(addr & ~(os.sysconf("SC_PAGE_SIZE") - 1))
    status = ctypes.c_int(-1)
    pages = (ctypes.c_void_p * 1)(page)
    rc = libc.syscall(nr, 0, ctypes.c_ulong(1), pages, None, ctypes.byref(status), 0)
    return status.value if rc == 0 and status.value >= 0 else 0


class Denied:
    """Why a remote access to a range was refused (codes travel on the wire)."""

    OK = 0
    BAD_RANGE = 1
    NOT_REGISTERED = 2
    NO_PERMISSION = 3
    NOT_HOST_MEMORY = 4
    ATTACH_REFUSED = 5
    INITIATOR_FAULT = 6

    REASONS = {
        BAD_RANGE: "empty range or range past the end of the address space",
        NOT_REGISTERED: "range is not inside a registered buffer of the target",
        NO_PERMISSION: "the target buffer does not allow this access",
        NOT_HOST_MEMORY: "the target buffer is not host memory reachable by this transport",
        ATTACH_REFUSED: "the target may not attach to this process's memory (cross-memory attach refused)",
        INITIATOR_FAULT: "the initiator's memory could not be accessed by the target",
    }


@dataclass(eq=False)
class Buffer:
    """A registered memory range.

    Attributes:
        addr: start address (virtual address in the owning process).
        length: size in bytes.
        location: ``"cpu:N"`` (NUMA node) or ``"cuda:N"`` (GPU ordinal).
        remote_read / remote_write: whether peers may read / write it.
    """

    addr: int
    length: int
    location: str
    remote_read: bool = True
    remote_write: bool = True
    keepalive: Any = field(default=None, repr=False)
    share: dict[str, Any] | None = None  # how same-host peers may map it ({"memfd": fd}), if they may
    _view: memoryview | None = field(default=None, repr=False)
    _users: int = field(default=0, repr=False)  # pins held by transfers (this engine's and peers')
    _dead: bool = field(default=False, repr=False)  # being unregistered (lookups skip it), or gone
    #: whether this is host memory (``cpu:N``); set from ``location``, read on every request
    is_host: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.is_host = self.location.startswith("cpu:")

    @property
    def end(self) -> int:
        """The address just past the buffer (``addr + length``)."""
        return self.addr + self.length

    def view(self, addr: int, length: int) -> memoryview:
        """Memoryview of ``[addr, addr+length)``, which must lie inside this host buffer."""
        if self._view is None:
            self._view = view_at(self.addr, self.length)
        off = addr - self.addr
        return self._view[off : off + length]

    def describe(self) -> dict[str, Any]:
        """The JSON-able form published in the segment descriptor."""
        d = {
            "addr": self.addr,
            "length": self.length,
            "location": self.location,
            "remote_read": self.remote_read,
            "remote_write": self.remote_write,
        }
        if self.share:
            d.update(self.share)
        return d


class SharedMemory:
    """A memfd-backed mapping whose first page is a control page peers read.

    Layout: ``[control page][data]``. The control page holds a state word (1
    while the buffer is registered, 0 after), a magic, the owning engine's
    instance id, the data's address in the owner and the rights peers have: a
    peer that opens the memfd through ``/proc/PID/fd`` checks the first four
    before trusting it (a pid can be reused), takes the rights from here and
    never from the descriptor (which a metadata store could have altered), and
    checks the state after each copy, so it never reports a transfer into memory
    that was unregistered meanwhile as completed.

    The kernel enforces the rights where it can: a memfd that peers may not
    write is sealed with ``F_SEAL_FUTURE_WRITE`` (Linux >= 5.1) once the owner
    holds its own writable mapping, so no other process can map it writable or
    write it, whatever it was told (root included). Every memfd is also sealed
    against resizing, so no peer can shrink it under the owner (SIGBUS).
    :meth:`share` says what peers may be told about it.
    """

    CONTROL = 4096
    MAGIC = b"MOONLET2"  # v2: the header carries the rights (v1 peers took them from the descriptor)
    HEADER = 48
    READ, WRITE = 1, 2  # bits of the rights word
    _F_ADD_SEALS = getattr(fcntl, "F_ADD_SEALS", 1033)
    _SEALS = (getattr(fcntl, "F_SEAL_SHRINK", 2) | getattr(fcntl, "F_SEAL_GROW", 4)
              | getattr(fcntl, "F_SEAL_SEAL", 1))
    _F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x10)

    def __init__(self, length: int, instance: str, remote_read: bool = True, remote_write: bool = True) -> None:
        if length <= 0:
            raise RegistrationError(f"cannot allocate {length} bytes")
        import mmap

        self.remote_read, self.remote_write = remote_read, remote_write
        self.fd = os.memfd_create("moonlet", os.MFD_CLOEXEC | getattr(os, "MFD_ALLOW_SEALING", 0))
        os.ftruncate(self.fd, self.CONTROL + length)
        self._map = mmap.mmap(self.fd, self.CONTROL + length)
        anchor = ctypes.c_char.from_buffer(self._map)
        self.addr = ctypes.addressof(anchor) + self.CONTROL
        del anchor  # the mapping stays put; only a live export would block release()
        self._map[:self.HEADER] = self.header(1, instance, self.addr, remote_read, remote_write)
        #: whether the kernel holds every other process to the write right (True for writable memory)
        self.enforced = self._seal(0 if remote_write else self._F_SEAL_FUTURE_WRITE)

    def _seal(self, extra: int) -> bool:
        """Seal the memfd against resizing, plus ``extra`` seals; whether ``extra`` (if any) took."""
        try:
            fcntl.fcntl(self.fd, self._F_ADD_SEALS, self._SEALS | extra)
            return True
        except OSError:  # no sealing here (kernel too old for F_SEAL_FUTURE_WRITE, or no MFD_ALLOW_SEALING)
            try:
                fcntl.fcntl(self.fd, self._F_ADD_SEALS, self._SEALS)
            except OSError:
                pass
            return not extra

    def share(self) -> dict[str, Any] | None:
        """What the descriptor may publish so same-host peers map the buffer: ``{"memfd": fd}``, or None
        when a mapping would give peers more than the buffer's rights (a mapping cannot stop reads, and an
        unsealed one cannot stop writes); such peers go through the target, which checks every access."""
        if not self.remote_read or not self.enforced:
            return None
        return {"memfd": self.fd}

    @classmethod
    def header(cls, state: int, instance: str, addr: int, remote_read: bool, remote_write: bool) -> bytes:
        """The first :attr:`HEADER` bytes of the control page."""
        rights = (cls.READ if remote_read else 0) | (cls.WRITE if remote_write else 0)
        return (state.to_bytes(8, "little") + cls.MAGIC + instance.encode()[:16].ljust(16)
                + addr.to_bytes(8, "little") + rights.to_bytes(8, "little"))

    @classmethod
    def rights(cls, head: bytes, instance: str, addr: int) -> tuple[bool, bool]:
        """``(remote_read, remote_write)`` as a live buffer's control page ``head`` states them; raise
        ValueError unless ``head`` is that of a registered buffer at ``addr`` of engine ``instance``."""
        if len(head) != cls.HEADER or head[:40] != cls.header(1, instance, addr, False, False)[:40]:
            raise ValueError("the peer's memfd is not the live buffer its descriptor names (pid reused?)")
        rights = int.from_bytes(head[40:], "little")
        return bool(rights & cls.READ), bool(rights & cls.WRITE)

    def release(self) -> None:
        """Mark the buffer gone for peers, then drop this process's mapping and descriptor."""
        self._map[:8] = bytes(8)
        self._map.close()
        os.close(self.fd)


def check_range(addr: int, length: int) -> None:
    """Reject ranges that are empty, negative or wrap past the end of the address space."""
    if not isinstance(addr, int) or not isinstance(length, int):
        raise MemoryAccessError(f"address and length must be integers, got {addr!r}, {length!r}")
    if length <= 0:
        raise MemoryAccessError(f"length must be positive, got {length}")
    if addr < 0 or addr + length > _ADDR_LIMIT:
        raise MemoryAccessError(f"range [{addr:#x}, +{length}) is outside the 64-bit address space")


class MemoryRegistry:
    """The set of buffers an engine has registered, keyed by address."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._bufs: list[Buffer] = []  # in the order of _starts (a list: one index, no hashing, per lookup)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._last: Buffer | None = None  # the last buffer a lookup returned; cleared when it is removed

    def __len__(self) -> int:
        return len(self._starts)

    def buffers(self) -> list[Buffer]:
        with self._lock:
            return list(self._bufs)

    def add(self, buf: Buffer) -> Buffer:
        """Insert ``buf``; refuse exact duplicates and overlaps with a clear reason."""
        check_range(buf.addr, buf.length)
        with self._lock:
            i = bisect.bisect_right(self._starts, buf.addr)
            for j in (i - 1, i):
                if 0 <= j < len(self._starts):
                    other = self._bufs[j]
                    if other.addr < buf.end and buf.addr < other.end:
                        what = "is already registered" if (other.addr, other.length) == (buf.addr, buf.length) \
                            else f"overlaps registered buffer [{other.addr:#x}, +{other.length})"
                        raise RegistrationError(f"range [{buf.addr:#x}, +{buf.length}) {what}")
            self._starts.insert(i, buf.addr)
            self._bufs.insert(i, buf)
        return buf

    def remove(self, addr: int, timeout: float, settle: Callable[[Buffer, float], None] | None = None) -> Buffer:
        """Unregister the buffer starting at ``addr`` once no transfer uses it: all or nothing.

        The buffer is first marked draining: lookups stop finding it, so no new
        transfer pins it (peers' requests are refused NOT_REGISTERED).
        ``settle(buf, deadline)``, if given, then lets the caller end its own
        transfers on it.  Then this waits, until ``timeout`` seconds after the
        call, for the last pin to go.  If one is still held then (or ``settle``
        raised), the buffer is restored exactly as it was and
        :class:`RegistrationError` says how many transfers hold it; otherwise it
        is removed and returned.
        """
        with self._lock:
            i = bisect.bisect_left(self._starts, addr)
            buf = self._bufs[i] if i < len(self._starts) and self._starts[i] == addr else None
            if buf is None:
                raise RegistrationError(f"no buffer is registered at {addr:#x}")
            if buf._dead:
                raise RegistrationError(f"buffer at {addr:#x} is already being unregistered")
            buf._dead = True
            if self._last is buf:
                self._last = None
        deadline = time.monotonic() + timeout
        try:
            if settle is not None:
                settle(buf, deadline)
            with self._lock:
                while buf._users:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise RegistrationError(
                            f"buffer at {addr:#x} is still in use by {buf._users} transfer(s) after {timeout}s; "
                            "it stays registered"
                        )
                    self._idle.wait(left)
                i = bisect.bisect_left(self._starts, addr)
                del self._starts[i]
                del self._bufs[i]
        except BaseException:
            with self._lock:
                buf._dead = False  # still registered, as before: lookups find it again
            raise
        return buf

    def _find_locked(self, addr: int, length: int) -> Buffer | None:
        last = self._last  # lookups mostly hit the buffer the previous one did
        if last is not None and last.addr <= addr and addr + length <= last.addr + last.length:
            return last
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0:
            return None
        buf = self._bufs[i]
        if addr + length > buf.addr + buf.length or buf._dead:  # dead: being unregistered (draining)
            return None
        self._last = buf
        return buf

    def find(self, addr: int, length: int) -> Buffer | None:
        """The buffer holding all of ``[addr, addr+length)``, or None."""
        last = self._last  # without the lock: remove() marks a buffer dead before it forgets it
        if last is not None and last.addr <= addr and addr + length <= last.addr + last.length and not last._dead:
            return last
        with self._lock:
            return self._find_locked(addr, length)

    def require(self, addr: int, length: int, what: str = "local") -> Buffer:
        """Like :meth:`find` but raise :class:`MemoryAccessError` naming the range."""
        check_range(addr, length)
        buf = self.find(addr, length)
        if buf is None:
            raise MemoryAccessError(f"{what} range [{addr:#x}, +{length}) is not inside a registered buffer: "
                                    f"{self._miss(addr, length)}")
        return buf

    def _miss(self, addr: int, length: int) -> str:
        """Why no buffer holds ``[addr, addr+length)``: by how much it overruns the buffer its start lies in."""
        with self._lock:
            i = bisect.bisect_right(self._starts, addr) - 1
            buf = self._bufs[i] if i >= 0 else None
        if buf is None or addr >= buf.end:
            return f"no registered buffer holds its start {addr:#x}"
        if buf._dead:
            return f"buffer [{buf.addr:#x}, +{buf.length}) is being unregistered"
        return (f"it overruns registered buffer [{buf.addr:#x}, +{buf.length}) by {addr + length - buf.end} "
                f"byte(s)")

    def acquire(self, ranges: Iterable[tuple[int, int]], write: bool) -> tuple[list[Buffer | int], list[Buffer]]:
        """Resolve and pin the buffers behind ``ranges`` for a remote access.

        Returns ``(per_range, pinned)``: per range its buffer, or a
        :class:`Denied` code saying why it may not be touched; and the
        distinct buffers pinned, to hand to :meth:`release`.
        """
        out: list[Buffer | int] = []
        pinned: list[Buffer] = []
        last: Buffer | None = None  # ranges of one frame mostly share a buffer: try it before a lookup
        seen: set[int] = set()  # ids of the buffers pinned
        with self._lock:
            for addr, length in ranges:
                if length <= 0 or addr < 0 or addr + length > _ADDR_LIMIT:
                    out.append(Denied.BAD_RANGE)
                    continue
                if last is not None and last.addr <= addr and addr + length <= last.addr + last.length:
                    out.append(last)
                    continue
                buf = self._find_locked(addr, length)
                if buf is None:
                    out.append(Denied.NOT_REGISTERED)
                elif not (buf.remote_write if write else buf.remote_read):
                    out.append(Denied.NO_PERMISSION)
                else:
                    out.append(buf)
                    last = buf
                    if id(buf) not in seen:  # a set: a frame may name thousands of distinct buffers
                        seen.add(id(buf))
                        pinned.append(buf)
                        buf._users += 1
        return out, pinned

    def pin_host(self, addr: int, length: int, write: bool) -> Buffer | int:
        """:meth:`acquire` of one range that must be host memory: its buffer, pinned (hand ``[buf]`` to
        :meth:`release`), or the :class:`Denied` code saying why not."""
        (buf,), pinned = self.acquire(((addr, length),), write)
        if type(buf) is Buffer and buf.is_host:
            return buf
        self.release(pinned)
        return buf if type(buf) is int else Denied.NOT_HOST_MEMORY

    def pin_more(self, bufs: Sequence[Buffer]) -> None:
        """Pin buffers that a running batch uses (its local buffers), even while they are being
        unregistered: the hold that outlives the batch while a same-host target may still
        copy into or out of them (see ``transport.tcp.frames.Pin``). Released by :meth:`release`."""
        with self._lock:
            for buf in bufs:
                buf._users += 1

    def release(self, pinned: Sequence[Buffer]) -> None:
        """Unpin buffers returned by :meth:`acquire` or given to :meth:`pin_more`."""
        if not pinned:
            return
        with self._lock:
            dying = False
            for buf in pinned:
                buf._users -= 1
                dying = dying or buf._dead
            if dying:  # remove() may be waiting for this buffer's last user
                self._idle.notify_all()


class PeerMapping:
    """This process's mapping of a peer's :class:`~moonlet.memory.SharedMemory` buffer.

    Everything the descriptor says is checked against the memfd itself (a regular
    file of the right size, whose control page names the engine and address), and
    the rights come from that control page, which only the owner writes: the data
    is mapped writable only when the owner lets peers write (for a buffer it does
    not, the kernel would refuse a writable mapping anyway: the memfd is sealed).
    """

    def __init__(self, peer: SegmentDescriptor, number: object, addr: int, length: int) -> None:
        """Map the peer's memfd ``number`` (from its descriptor: checked here) holding its buffer ``addr``
        of ``length`` bytes."""
        size = SharedMemory.CONTROL + length
        if type(number) is not int or number < 0:  # a string could name any file: "../../../tmp/x"
            raise ValueError(f"memfd must be a file descriptor number, got {number!r}")
        path = f"/proc/{peer.pid}/fd/{number}"
        _check_file(os.stat(path), size)  # before opening: the fd might name a FIFO or a device
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        try:
            st = _check_file(os.fstat(fd), size)
            readable, self.writable = SharedMemory.rights(os.pread(fd, SharedMemory.HEADER, 0), peer.instance,
                                                          addr)
            if not readable:
                raise ValueError("the peer does not let peers read this buffer")
            if self.writable:
                os.close(fd)
                fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY)
                again = os.fstat(fd)
                if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino):
                    raise ValueError("the peer's memfd changed while it was opened")
            self._map = mmap.mmap(fd, size, prot=mmap.PROT_READ | (mmap.PROT_WRITE if self.writable else 0))
        finally:
            os.close(fd)
        self._view = memoryview(self._map)
        self._state = self._view[:8]
        self.data = self._view[SharedMemory.CONTROL:]
        self._word = self.data[:8].cast("Q")  # read before every submit to this peer: one index, no copy

    def alive(self) -> bool:
        return self._state[0] == 1

    def word(self) -> int:
        """The first 8 data bytes as an integer (a peer engine's generation counter)."""
        return self._word[0]

    def close(self) -> None:
        for view in (self._word, self.data, self._state, self._view):
            view.release()
        self._map.close()


def _check_file(st: os.stat_result, size: int) -> os.stat_result:
    """``st`` if it is a regular file (a memfd) of ``size`` bytes; raise ValueError otherwise."""
    if not stat.S_ISREG(st.st_mode) or st.st_size != size:
        raise ValueError("the peer's memfd is not a buffer of the size its descriptor names")
    return st
