"""Same-process transport: a transfer to one's own segment is a bounds-checked memmove."""

from __future__ import annotations

import ctypes

from ..batch import Batch, State
from ..memory import Buffer, Denied, MemoryRegistry
from ..segment import Segment, SegmentDescriptor
from .base import Transport, WorkItem


class LocalTransport(Transport):
    name = "local"

    def __init__(self, registry: MemoryRegistry, instance: str) -> None:
        self._registry = registry
        self._instance = instance

    def reaches(self, local: Buffer, peer: SegmentDescriptor, remote: dict) -> bool:
        return peer.instance == self._instance and local.is_host and remote["location"].startswith("cpu:")

    def submit(self, segment: Segment, batch: Batch, items: list[WorkItem]) -> None:
        batch.add_parts([(index, 1) for index, *_ in items], self.name)
        for index, req, *_ in items:
            # The "remote" side is our own registry: check it as a target would, and pin it.
            (buf,), pinned = self._registry.acquire([(req.remote_addr, req.length)], write=bool(req.op))
            try:
                if type(buf) is not Buffer or not buf.is_host:
                    code = buf if type(buf) is int else Denied.NOT_HOST_MEMORY
                    batch.part_done(index, State.FAILED, f"[{req.remote_addr:#x}, +{req.length}): "
                                                         f"{Denied.REASONS[code]}")
                    continue
                src, dst = (req.local_addr, req.remote_addr) if req.op else (req.remote_addr, req.local_addr)
                ctypes.memmove(dst, src, req.length)
            finally:
                self._registry.release(pinned)
            batch.part_done(index)
