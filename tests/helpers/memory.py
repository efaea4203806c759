"""Random registered memory and SHA-256 digests: what the tests write, and how they check what landed.

Memory is filled with random bytes, never zeros, so a transfer that moves nothing (or the wrong range)
is caught; digests are compared with what a target reports (``PeerProcess.digest`` gives the same form).
"""

from __future__ import annotations

import hashlib
import mmap
import os

from moonlet import TransferEngine
from moonlet.memory import Buffer

Bytes = bytes | bytearray | memoryview | mmap.mmap


def sha(data: Bytes) -> str:
    """The SHA-256 of ``data``, in hex."""
    return hashlib.sha256(data).hexdigest()


def random_mmap(size: int) -> mmap.mmap:
    """An anonymous mapping of ``size`` random bytes (page-aligned, as registered memory usually is)."""
    m = mmap.mmap(-1, size)
    m[:] = os.urandom(size)
    return m


def register_random(eng: TransferEngine, size: int) -> tuple[Buffer, memoryview]:
    """``size`` random bytes in an anonymous mapping registered with ``eng``: the buffer, and a view of the
    mapping (which keeps it alive)."""
    m = random_mmap(size)
    return eng.register(m), memoryview(m)
