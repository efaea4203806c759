"""Same-process transport: a transfer to one's own segment, or to another engine of this process, is a
checked memmove (or GPU copy) in the submitting thread: no socket, no copy through the kernel.

The memory's owner still decides: each range is resolved, checked for the access (the owner's rights) and
pinned in the owning engine's registry, exactly as its target would, and a peer engine that has closed is
simply not reachable this way any more (its registry is gone from the process-wide map).
"""

from __future__ import annotations

import ctypes
import os
import weakref

from ... import gpu
from ...batch import Batch, State
from ...memory import Buffer, Denied, MemoryRegistry
from ...segment import RemoteBuffer, Segment, SegmentDescriptor
from ..base import HostContext, Transport, WorkItem
from ..spec import TransportSpec

#: The registries of this process's open engines, by instance id: what a same-process peer's memory is
#: checked and pinned in. Weak: an engine dropped without close() does not live on here.
_ENGINES: weakref.WeakValueDictionary[str, MemoryRegistry] = weakref.WeakValueDictionary()


class LocalTransport(Transport):
    name = "local"

    def __init__(self, registry: MemoryRegistry, instance: str, host: str = "") -> None:
        self._registry = registry
        self._instance = instance
        self._host = host
        self._pid = os.getpid()
        self._streams: dict[int, gpu.Stream] = {}
        _ENGINES[instance] = registry

    def reaches(self, local: Buffer, peer: SegmentDescriptor, remote: RemoteBuffer) -> bool:
        if peer.instance != self._instance and not (peer.pid == self._pid and peer.host == self._host
                                                    and peer.instance in _ENGINES):
            return False
        return (local.is_host and remote.is_host) or gpu.available()

    def submit(self, segment: Segment, batch: Batch, items: list[WorkItem]) -> None:
        batch.add_parts([(index, 1) for index, *_ in items], self.name)
        peer = segment.descriptor.instance
        registry = self._registry if peer == self._instance else _ENGINES.get(peer)
        if registry is None:
            for index, *_ in items:
                batch.part_done(index, State.FAILED, f"{segment.name}: the engine closed")
            return
        for index, req, local, _ in items:
            # The "remote" side is a registry of this process: check it as a target would, and pin it.
            (buf,), pinned = registry.acquire([(req.remote_addr, req.length)], write=bool(req.op))
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
                registry.release(pinned)
            batch.part_done(index)

    def close(self) -> None:
        if _ENGINES.get(self._instance) is self._registry:
            del _ENGINES[self._instance]


def _start(ctx: HostContext) -> LocalTransport:
    return LocalTransport(ctx.registry, ctx.instance, ctx.host)


SPEC = TransportSpec("local", _start)
