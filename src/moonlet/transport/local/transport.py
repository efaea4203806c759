"""Same-process transport: a transfer to one's own segment is a bounds-checked memmove (or GPU copy)."""

from __future__ import annotations

import ctypes

from ... import gpu
from ...batch import Batch, State
from ...memory import Buffer, Denied, MemoryRegistry
from ...segment import RemoteBuffer, Segment, SegmentDescriptor
from ..base import HostContext, Transport, WorkItem
from ..spec import TransportSpec


class LocalTransport(Transport):
    name = "local"

    def __init__(self, registry: MemoryRegistry, instance: str) -> None:
        self._registry = registry
        self._instance = instance
        self._streams: dict[int, gpu.Stream] = {}

    def reaches(self, local: Buffer, peer: SegmentDescriptor, remote: RemoteBuffer) -> bool:
        if peer.instance != self._instance:
            return False
        return (local.is_host and remote.is_host) or gpu.available()

    def submit(self, segment: Segment, batch: Batch, items: list[WorkItem]) -> None:
        batch.add_parts([(index, 1) for index, *_ in items], self.name)
        for index, req, local, _ in items:
            # The "remote" side is our own registry: check it as a target would, and pin it.
            (buf,), pinned = self._registry.acquire([(req.remote_addr, req.length)], write=bool(req.op))
            try:
                if not isinstance(buf, Buffer):
                    batch.part_done(index, State.FAILED, f"[{req.remote_addr:#x}, +{req.length}): "
                                                         f"{Denied.REASONS[buf]}")
                    continue
                src, dst = (req.local_addr, req.remote_addr) if req.op else (req.remote_addr, req.local_addr)
                if local.is_host and buf.is_host:
                    ctypes.memmove(dst, src, req.length)
                else:
                    device = int((local if not local.is_host else buf).location.split(":")[1])
                    stream = self._streams.get(device) or self._streams.setdefault(device, gpu.Stream(device))
                    stream.copy([(dst, src, req.length)])
                    stream.synchronize()
            except gpu.GpuError as e:
                batch.part_done(index, State.FAILED, str(e))
                continue
            finally:
                self._registry.release(pinned)
            batch.part_done(index)


def _start(ctx: HostContext) -> LocalTransport:
    return LocalTransport(ctx.registry, ctx.instance)


SPEC = TransportSpec("local", _start)
