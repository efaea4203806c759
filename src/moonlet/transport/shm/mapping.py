"""A same-host peer's ``allocate()`` buffer mapped into this process, checked against the memfd itself."""

from __future__ import annotations

import mmap
import os
import stat

from ...memory import SharedMemory
from ...segment import SegmentDescriptor


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
