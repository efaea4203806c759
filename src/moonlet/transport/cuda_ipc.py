"""Same-host GPU transport: CUDA IPC, copies by the initiator's GPU over NVLink or PCIe.

A target publishes, for each registered GPU buffer, the CUDA IPC handle of the
allocation holding it and the GPU's UUID.  The initiator opens each handle
once (cached; closed when the peer restarts or the engine closes), and moves
the bytes of a whole batch with one batched copy call
(``cuMemcpyBatchAsync`` where the driver has it) on a stream of its own, so
the CPU does not wait on the GPU: ``submit`` returns at once and the batch
completes when the stream's event fires.  The local side may be GPU memory or
host memory (pinned by :meth:`register` for full speed).

What the descriptor says is not trusted to stay inside the peer's memory: after
opening a handle, the transport asks CUDA for the range the opened allocation
really spans, and refuses requests outside it (a lying descriptor could
otherwise aim copies at whatever this process has mapped next to it).

Rights have a limit here: a CUDA IPC mapping is always readable and writable,
and it spans the whole allocation, so a peer holding the handle can do anything
to it.  A target therefore publishes no handle for a buffer registered with
``remote_read=False`` or ``remote_write=False``: peers reach such memory over
the TCP staging path, where the target checks every access.  The rights checks
below only keep an honest initiator to what the descriptor says; and every
buffer in an allocation whose handle was published is open to peers, so
memory peers may not write must not share an allocation with memory they may.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from .. import gpu
from ..batch import Batch, State
from ..memory import Buffer
from ..segment import RemoteBuffer, Segment, SegmentDescriptor
from .base import HostContext, Transport, WorkItem
from .spec import TransportSpec

log = logging.getLogger("moonlet.cuda_ipc")


class CudaIpcTransport(Transport):
    name = "cuda_ipc"

    def __init__(self, host: str, pidns: str, instance: str, kernel_max_block: int) -> None:
        self._kernel_max = kernel_max_block
        self._host = host
        self._pidns = pidns
        self._instance = instance
        self._lock = threading.Lock()
        # (peer instance, handle, device) -> (base here, size of the allocation CUDA mapped)
        self._opened: dict[tuple[str, str, int], tuple[int, int]] = {}
        self._failed: dict[tuple[str, str], str] = {}
        self._streams: dict[int, gpu.Stream] = {}
        self._pending: dict[int, list[tuple[Any, list[int]]]] = {}  # id(batch) -> [(event, indices)]
        self._ordinals: dict[str, int | None] = {}
        self._pinned: set[int] = set()

    def endpoint(self) -> str:
        return "ipc"

    def _ordinal(self, uuid: str) -> int | None:
        if uuid not in self._ordinals:
            self._ordinals[uuid] = gpu.ordinal_of(uuid)
        return self._ordinals[uuid]

    def reaches(self, local: Buffer, peer: SegmentDescriptor, remote: RemoteBuffer) -> bool:
        if not (remote.ipc is not None and "cuda_ipc" in peer.endpoints and peer.host == self._host
                and peer.pidns == self._pidns and peer.instance != self._instance):
            return False
        if remote.ipc_base is None or remote.gpu is None:
            return False  # a handle without its base or GPU: the TCP path asks the target instead
        if (peer.instance, remote.ipc) in self._failed:
            return False
        return self._ordinal(remote.gpu) is not None

    def register(self, buf: Buffer) -> None:
        # Host memory that GPU copies may touch is page-locked, so copies are fast and truly async.
        if buf.is_host and gpu.available():
            try:
                gpu.pin_host(buf.addr, buf.length)
                self._pinned.add(buf.addr)
            except gpu.GpuError as e:
                log.info("could not pin host buffer %#x (+%d): %s", buf.addr, buf.length, e)

    def unregister(self, buf: Buffer) -> None:
        if buf.addr in self._pinned:
            self._pinned.discard(buf.addr)
            gpu.unpin_host(buf.addr)

    def _device_for(self, local: Buffer, remote: RemoteBuffer) -> int:
        """Run the copy on the local GPU when there is one (it then reads/writes its peer over NVLink)."""
        if not local.is_host:
            return int(local.location.split(":")[1])
        assert remote.gpu is not None  # reaches() said so
        ordinal = self._ordinal(remote.gpu)
        assert ordinal is not None
        return ordinal

    def _open(self, peer: SegmentDescriptor, remote: RemoteBuffer, device: int) -> int:
        """The offset from the peer's addresses of ``remote`` to this process's mapping of them; raise
        GpuError if the handle does not open, or if ``remote`` is not inside the allocation it maps."""
        handle, handle_base = remote.ipc, remote.ipc_base
        assert handle is not None and handle_base is not None  # reaches() said so
        key = (peer.instance, handle, device)
        with self._lock:
            opened = self._opened.get(key)
            if opened is None:
                opened = self._opened[key] = _open_handle(handle, device)
        base, size = opened
        start = remote.addr - handle_base
        if start < 0 or start + remote.length > size:
            raise gpu.GpuError(f"the descriptor puts buffer [{remote.addr:#x}, +{remote.length}) outside "
                               f"the {size}-byte allocation its handle maps at {handle_base:#x}")
        return base - handle_base

    def _stream(self, device: int) -> gpu.Stream:
        with self._lock:
            stream = self._streams.get(device)
            if stream is None:
                stream = self._streams[device] = gpu.Stream(device, self._kernel_max)
            return stream

    def submit(self, segment: Segment, batch: Batch, items: list[WorkItem]) -> None:
        peer = segment.descriptor
        batch.add_parts([(index, 1) for index, *_ in items], self.name)
        by_device: dict[int, tuple[list, list]] = {}
        device_only: dict[int, bool] = {}
        for index, req, local, remote in items:
            if not (remote.remote_write if req.op else remote.remote_read):
                batch.part_done(index, State.FAILED, f"{peer.name} does not allow this access to "
                                                     f"[{req.remote_addr:#x}, +{req.length})")
                continue
            device = self._device_for(local, remote)
            try:
                there = req.remote_addr + self._open(peer, remote, device)
            except gpu.GpuError as e:
                self._failed[(peer.instance, str(remote.ipc))] = str(e)
                log.warning("CUDA IPC to %s unusable (%s); later requests use TCP", peer.name, e)
                batch.part_done(index, State.FAILED, f"CUDA IPC to {peer.name}: {e}")
                continue
            copies, refs = by_device.setdefault(device, ([], []))
            device_only[device] = device_only.get(device, True) and not local.is_host
            copies.append((there, req.local_addr, req.length) if req.op else (req.local_addr, there, req.length))
            refs.append(index)
        events = []
        for device, (copies, refs) in by_device.items():
            stream = self._stream(device)
            try:
                events.append((stream.copy(copies, device_only[device], record=True), refs))
            except gpu.GpuError as e:
                stream.synchronize()
                for index in refs:
                    batch.part_done(index, State.FAILED, str(e))
        if events:
            with self._lock:
                self._pending.setdefault(id(batch), []).extend(events)

    def submit_many(self, segment: Segment, batch: Batch, op: int, local_addrs: list[int],
                    remote_addrs: list[int], lengths: list[int], local: Buffer, remote: RemoteBuffer) -> None:
        peer = segment.descriptor
        batch.add_parts_all(self.name)
        everyone = list(range(len(lengths)))
        if not (remote.remote_write if op else remote.remote_read):
            for index in everyone:
                batch.part_done(index, State.FAILED, f"{peer.name} does not allow this access to its buffer "
                                                     f"[{remote.addr:#x}, +{remote.length})")
            return
        device = self._device_for(local, remote)
        try:
            off = self._open(peer, remote, device)
            there = [a + off for a in remote_addrs]
            dsts, srcs = (there, local_addrs) if op else (local_addrs, there)
            event = self._stream(device).copy_columns(dsts, srcs, lengths, not local.is_host, record=True)
        except gpu.GpuError as e:
            for index in everyone:
                batch.part_done(index, State.FAILED, f"CUDA IPC to {peer.name}: {e}")
            return
        with self._lock:
            self._pending.setdefault(id(batch), []).append((event, everyone))

    def drive(self, batch: Batch, block: bool) -> None:
        with self._lock:
            events = self._pending.get(id(batch), [])
        done = []
        for event, refs in events:
            try:
                finished = gpu.event_done(event, block)
            except gpu.GpuError as e:
                for index in refs:
                    batch.part_done(index, State.FAILED, str(e))
                done.append(event)
                continue
            if finished:
                batch.parts_completed(refs)
                done.append(event)
        if done:
            with self._lock:
                left = [e for e in self._pending.get(id(batch), []) if e[0] not in done]
                if left:
                    self._pending[id(batch)] = left
                else:
                    self._pending.pop(id(batch), None)

    def close(self) -> None:
        with self._lock:
            opened, self._opened = self._opened, {}
        for (_, _, device), (base, _size) in opened.items():
            try:
                gpu.ipc_close(base, device)
            except gpu.GpuError as e:
                log.info("closing a CUDA IPC mapping failed: %s", e)
        for addr in list(self._pinned):
            try:
                gpu.unpin_host(addr)
            except gpu.GpuError:
                pass
        self._pinned.clear()


def _open_handle(handle: str, device: int) -> tuple[int, int]:
    """Open a peer's CUDA IPC handle (hex) on ``device``: (base here, size of the allocation CUDA mapped)."""
    try:
        raw = bytes.fromhex(handle)
    except ValueError:
        raw = b""
    if len(raw) != 64:
        raise gpu.GpuError(f"malformed CUDA IPC handle {handle[:40]!r} in the descriptor")
    base = gpu.ipc_open(raw, device)  # leaves ``device`` current in this thread
    try:
        start, size = gpu.check(gpu.driver().cuMemGetAddressRange(base), "cuMemGetAddressRange")
        if int(start) != base:
            raise gpu.GpuError(f"an opened IPC handle maps {base:#x}, inside an allocation at {int(start):#x}")
    except gpu.GpuError:
        gpu.ipc_close(base, device)
        raise
    return base, int(size)


def _start(ctx: HostContext) -> CudaIpcTransport:
    return CudaIpcTransport(ctx.host, ctx.pidns, ctx.instance, ctx.config.gpu_kernel_max_block)


SPEC = TransportSpec("cuda_ipc", _start, missing=lambda cfg: gpu.unavailable_reason())
