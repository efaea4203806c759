"""Same-process transport: a transfer to one's own segment, or to another engine of this process, is a
checked memmove (or GPU copy) in the submitting thread: no socket, no copy through the kernel.

The memory's owner still decides: each range is resolved, checked for the access (the owner's rights) and
pinned in the owning engine's registry, exactly as its target would. Another engine is reached this way only
when it would let this one in over the wire: it runs with the same cluster secret (or both with none) and
the same TLS authority, and the descriptor names it (its segment name, as it calls itself). A peer engine
that closes leaves the process-wide map first, then waits for the copies other engines have under way into
its memory, so none lands after its close returns.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from ... import gpu
from ...batch import Batch, State
from ...memory import Buffer, Denied, MemoryRegistry
from ...segment import RemoteBuffer, Segment, SegmentDescriptor
from ..base import HostContext, Transport, WorkItem
from ..spec import TransportSpec

_CLOSE_WAIT = 30.0  # the most an engine's close waits for other engines' copies into its memory


class _Owner:
    """An engine of this process as its same-process peers may use it: its registry, its name, whom it
    would admit (``trust``: secret and TLS authority), and the copies under way into its memory."""

    def __init__(self, registry: MemoryRegistry, identity: Callable[[], dict[str, Any]], trust: object) -> None:
        self.registry = registry
        self.identity = identity
        self.trust = trust
        self.busy = 0  # copies under way (other engines' submitting threads)
        self.closed = False
        self.cond = threading.Condition()

    def enter(self) -> bool:
        with self.cond:
            if self.closed:
                return False
            self.busy += 1
            return True

    def leave(self) -> None:
        with self.cond:
            self.busy -= 1
            if not self.busy:
                self.cond.notify_all()

    def close(self) -> None:
        """No new copies; wait (bounded) for those under way."""
        deadline = time.monotonic() + _CLOSE_WAIT
        with self.cond:
            self.closed = True
            while self.busy and time.monotonic() < deadline:
                self.cond.wait(deadline - time.monotonic())


#: This process's open engines, by instance id. Weak: an engine dropped without close() does not live on.
_ENGINES: weakref.WeakValueDictionary[str, _Owner] = weakref.WeakValueDictionary()


def _trust(ctx: HostContext) -> object:
    """What two engines must share for one to reach the other without the wire's handshake."""
    secret = ctx.security.secret
    tls = ctx.security.tls
    return (None if secret is None else secret.mac(b"moonlet-same-process", b""),
            None if tls is None else tls.ca)


class LocalTransport(Transport):
    name = "local"

    def __init__(self, registry: MemoryRegistry, instance: str, host: str = "",
                 identity: Callable[[], dict[str, Any]] = dict, trust: object = None) -> None:
        self._registry = registry
        self._instance = instance
        self._host = host
        self._pid = os.getpid()
        self._trust = trust
        self._streams: dict[int, gpu.Stream] = {}
        self._owner = _ENGINES[instance] = _Owner(registry, identity, trust)

    def reaches(self, local: Buffer, peer: SegmentDescriptor, remote: RemoteBuffer) -> bool:
        if peer.instance != self._instance and not self._admits(peer):
            return False
        return (local.is_host and remote.is_host) or gpu.available()

    def _admits(self, peer: SegmentDescriptor) -> bool:
        """Whether ``peer`` is another open engine of this process that would admit us, named as it is."""
        if peer.pid != self._pid or peer.host != self._host:
            return False
        owner = _ENGINES.get(peer.instance)
        return owner is not None and owner.trust == self._trust and owner.identity().get("name") == peer.name

    def submit(self, segment: Segment, batch: Batch, items: list[WorkItem]) -> None:
        batch.add_parts([(index, 1) for index, *_ in items], self.name)
        peer = segment.descriptor.instance
        owner = self._owner if peer == self._instance else _ENGINES.get(peer)
        if owner is None or not owner.enter():
            for index, *_ in items:
                batch.part_done(index, State.FAILED, f"{segment.name}: the engine closed")
            return
        try:
            self._copy(owner.registry, batch, items)
        finally:
            owner.leave()

    def _copy(self, registry: MemoryRegistry, batch: Batch, items: list[WorkItem]) -> None:
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
        if _ENGINES.get(self._instance) is self._owner:
            del _ENGINES[self._instance]
        self._owner.close()


def _start(ctx: HostContext) -> LocalTransport:
    return LocalTransport(ctx.registry, ctx.instance, ctx.host, ctx.identity, _trust(ctx))


SPEC = TransportSpec("local", _start)
