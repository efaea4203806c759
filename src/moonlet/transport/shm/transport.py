"""Same-host transport for host memory: one copy, no socket.

Two paths, picked per buffer:

- **Mapped**: a buffer the peer made with ``engine.allocate()`` lives in a memfd.
  This engine maps it (through ``/proc/PID/fd``, after checking the control
  page names the right engine and buffer) and copies with a plain memcpy, with
  no round trip at all.  The rights are the ones the owner wrote in the control
  page, never the descriptor's (a metadata store may lie): a buffer peers may not
  write is mapped read-only, and its memfd is sealed so the kernel refuses a
  writable mapping to anyone else; one they may not read is not published at
  all.  The control page's state word, checked after each copy, tells whether
  the peer unregistered the buffer meanwhile.
- **Attached**: for any other registered memory, requests ride the TCP transport's
  connections as PULL (a WRITE: the target
reads the initiator's memory into its registered buffer) and PUSH (a READ: the
target writes its buffer into the initiator's memory) frames, each served by
one ``process_vm_readv``/``process_vm_writev`` call for the whole frame.  So the
bytes cross once, with no socket copies, while the target still checks and
pins every range it touches, exactly as for TCP.  Since the target copies when
it reads the frame, maybe after its batch ended (a deadline), each frame names
its local buffers (``tcp.frames.Pin``), which stay pinned until the target is
done with it: ``unregister`` waits for that.

The target attaches only to an initiator that shares its host and PID
namespace and owns the connection.  Where the kernel refuses (ptrace policy,
containers), the target answers ATTACH_REFUSED, the requests go over TCP
instead, and this transport stops offering itself for that peer (logged once;
``moonlet info`` says why it cannot work here).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from ...batch import Batch, State
from ...memory import Buffer, Denied, MemoryRegistry, PeerMapping
from ...segment import RemoteBuffer, Segment, SegmentDescriptor
from ..base import HostContext, Transport, WorkItem, contiguous
from ..spec import TransportSpec
from ..tcp import frames
from ..tcp import protocol as P
from ..tcp.client import Peer
from ..tcp.transport import TcpTransport
from . import cma
from .target import AttachTarget

log = logging.getLogger("moonlet.shm")

#: Bytes the PULL / PUSH frames of one submit name at most (their payload never crosses the socket: the
#: target copies it with process_vm_readv/writev): large, so a batch pipelines in few frames.
ATTACH_FRAME_BYTES = 64 << 20


class SameHostTransport(Transport):
    name = "shm"

    def __init__(self, tcp: TcpTransport, registry: MemoryRegistry, host: str, pidns: str,
                 on_fallback: Callable[[str, str, str, int], None] = lambda *_: None) -> None:
        """``on_fallback``: told how many requests went over TCP instead (the kernel refused the copy)."""
        self._tcp = tcp
        self._on_fallback = on_fallback
        self._registry = registry  # where attach frames pin the local buffers their targets copy
        self._host = host
        self._pidns = pidns
        self._pid = os.getpid()
        self._refused: set[tuple[str, str]] = set()  # (segment name, instance)
        # (instance, buffer addr, length) -> mapping: a descriptor naming another length gets a new check
        self._maps: dict[tuple[str, int, int], PeerMapping] = {}
        self._unmappable: set[tuple[str, int, int]] = set()
        tcp.on_attach_refused = self._note_refused

    def endpoint(self) -> str:
        return self._tcp.endpoint()

    def reaches(self, local: Buffer, peer: SegmentDescriptor, remote: RemoteBuffer) -> bool:
        return ("shm" in peer.endpoints and "tcp" in peer.endpoints and peer.host == self._host
                and peer.pidns == self._pidns and peer.pid != self._pid
                and local.is_host and remote.is_host
                and (peer.name, peer.instance) not in self._refused)

    def _note_refused(self, peer: Peer, count: int) -> None:
        self._on_fallback(self.name, "tcp", "attach refused", count)
        key = (peer.name, peer.instance)
        if key not in self._refused:
            self._refused.add(key)
            log.warning("same-host copies with %s refused by the kernel; using TCP for it "
                        "(see `moonlet info`)", peer.name)

    def submit(self, segment: Segment, batch: Batch, items: list[WorkItem]) -> None:
        batch.add_parts([(index, 1) for index, *_ in items], self.name)
        attach = [item for item in items if not self._copy_mapped(segment.descriptor, batch, item)]
        if not attach:
            return
        peer = self._tcp.peer(segment)
        for frame in frames.attach_requests(attach, batch, self._registry, ATTACH_FRAME_BYTES,
                                            self._tcp.config.frame_entries):  # no payload on the socket
            peer.send(frame)

    def submit_many(self, segment: Segment, batch: Batch, op: int, local_addrs: list[int],
                    remote_addrs: list[int], lengths: list[int], local: Buffer, remote: RemoteBuffer) -> None:
        peer = segment.descriptor
        mapped = self._mapping(peer, remote) if remote.memfd is not None else None
        if mapped is None:
            self._attach_many(segment, batch, op, local_addrs, remote_addrs, lengths, local)
            return
        batch.add_parts_all(self.name)
        if op and not mapped.writable:  # the owner's word, not the descriptor's
            why = _refusal(peer, remote.addr, remote.length)
            for index in range(len(lengths)):
                batch.part_done(index, State.FAILED, why)
            return
        data, view, base = mapped.data, local.view, remote.addr
        everyone = range(len(lengths))
        if len(lengths) > 1 and contiguous(local_addrs, remote_addrs, lengths):  # one range: one copy
            local_addrs, remote_addrs, lengths = local_addrs[:1], remote_addrs[:1], [sum(lengths)]
        if op:
            for a, b, n in zip(local_addrs, remote_addrs, lengths):
                data[b - base:b - base + n] = view(a, n)
        else:
            for a, b, n in zip(local_addrs, remote_addrs, lengths):
                view(a, n)[:] = data[b - base:b - base + n]
        if mapped.alive():
            batch.parts_completed(everyone)
            return
        self._unmap((peer.instance, base, remote.length))
        for index in everyone:
            batch.part_done(index, State.FAILED, f"{peer.name} unregistered [{base:#x}, +{remote.length}) "
                                                 f"during the transfer")

    def _attach_many(self, segment: Segment, batch: Batch, op: int, local_addrs: list[int],
                     remote_addrs: list[int], lengths: list[int], local: Buffer) -> None:
        """The array form of the attached path: PULL (WRITE) or PUSH (READ) frames built straight from
        the arrays, as few as the frame limits allow."""
        peer = self._tcp.peer(segment)
        kind = P.PULL if op else P.PUSH
        batch.add_parts_all(self.name)
        cfg = self._tcp.config
        for frame in frames.attach_arrays(kind, local_addrs, remote_addrs, lengths, local, batch, self._registry,
                                          ATTACH_FRAME_BYTES, cfg.frame_entries):
            peer.send(frame)

    def _copy_mapped(self, peer: SegmentDescriptor, batch: Batch, item: WorkItem) -> bool:
        """Serve ``item`` by memcpy through a mapping of the peer's buffer; False if it has none."""
        index, req, local, remote = item
        if remote.memfd is None:
            return False
        mapped = self._mapping(peer, remote)
        if mapped is None:
            return False
        if req.op and not mapped.writable:  # the owner's word, not the descriptor's
            batch.part_done(index, State.FAILED, _refusal(peer, req.remote_addr, req.length))
            return True
        off = req.remote_addr - remote.addr
        if req.op:
            mapped.data[off:off + req.length] = local.view(req.local_addr, req.length)
        else:
            local.view(req.local_addr, req.length)[:] = mapped.data[off:off + req.length]
        if mapped.alive():
            batch.part_done(index)
        else:
            self._unmap((peer.instance, remote.addr, remote.length))
            batch.part_done(index, State.FAILED, f"{peer.name} unregistered [{remote.addr:#x}, "
                                                 f"+{remote.length}) during the transfer")
        return True

    def _mapping(self, peer: SegmentDescriptor, remote: RemoteBuffer) -> PeerMapping | None:
        key = (peer.instance, remote.addr, remote.length)
        mapped = self._maps.get(key)
        if mapped is not None and mapped.alive():
            return mapped
        if mapped is not None:
            self._unmap(key)
        if key in self._unmappable:
            return None
        try:
            mapped = self._maps[key] = PeerMapping(peer, remote.memfd, remote.addr, remote.length)
        except (OSError, ValueError) as e:
            self._unmappable.add(key)
            log.info("cannot map buffer %#x of %s (%s); the target will copy instead", remote.addr, peer.name, e)
            return None
        return mapped

    def _unmap(self, key: tuple[str, int, int]) -> None:
        mapped = self._maps.pop(key, None)
        if mapped is not None:
            mapped.close()

    def close(self) -> None:
        for key in list(self._maps):
            self._unmap(key)

    def drive(self, batch: Batch, block: bool) -> None:
        self._tcp.drive(batch, block)

    def expire(self, batch: Batch) -> None:
        self._tcp.expire(batch)


def _refusal(peer: SegmentDescriptor, addr: int, length: int) -> str:
    """Why a WRITE into a mapped buffer its owner keeps read-only fails (as the target would say it)."""
    return f"{peer.name} refused [{addr:#x}, +{length}): {Denied.REASONS[Denied.NO_PERMISSION]}"


def _start(ctx: HostContext) -> SameHostTransport:
    """Ride the TCP transport's lanes: offer our pid in its HELLO, serve peers' PULL/PUSH frames on its server."""
    tcp = ctx.started["tcp"]
    assert isinstance(tcp, TcpTransport)
    cma.allow_peers()
    tcp.greet_with({"pid": os.getpid(), "host": ctx.host, "pidns": ctx.pidns})
    tcp.server.add_frames(AttachTarget(ctx.registry, tcp.server.identity))
    return SameHostTransport(tcp, ctx.registry, ctx.host, ctx.pidns, ctx.on_fallback)


SPEC = TransportSpec("shm", _start,
                     missing=lambda cfg: "" if cma.AVAILABLE else "process_vm_readv is not available")

__all__ = ["SPEC", "SameHostTransport"]
