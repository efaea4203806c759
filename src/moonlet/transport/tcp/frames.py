"""Every request frame an initiator sends (WRITE, READ, and the same-host PULL, PUSH) is built here.

Transports describe what to carry (requests, arrays of ranges, slices) and
this module cuts it into :class:`OutFrame` objects within the frame limits
(``frame_bytes``, ``frame_entries``), each with its table, its views of local
memory and the batch indices it ends; a lane encodes the head
(:func:`.protocol.encode_request_flat`) and sends head and views in one
``sendmsg``.  The builders run once per frame, not per request, where the
input allows: arrays of adjacent ranges become one entry.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple

from ...batch import Batch
from ...gpu import Stage
from ...memory import Buffer, MemoryRegistry
from ..base import WorkItem, contiguous
from .protocol import PULL, PUSH, READ, WRITE

_req_ids = itertools.count(1)

#: A GPU range of a frame staged through pinned host memory: (device address, length, device ordinal).
Staged = tuple[int, int, int]


class Pin(NamedTuple):
    """The local buffers of ``registry`` an attach frame's target copies into or out of. Each lane that
    dies with the frame unanswered pins them (:meth:`take`, while the frame's batch still pins them too)
    and unpins them once (:meth:`release`) when it settles; see ``client.py``."""

    registry: MemoryRegistry
    bufs: list[Buffer]

    def take(self) -> None:
        self.registry.pin_more(self.bufs)

    def release(self) -> None:
        self.registry.release(self.bufs)


class OutFrame:
    """One WRITE or READ frame (or PULL/PUSH: attach frames): several requests (or slices) bound for one peer."""

    __slots__ = ("kind", "req_id", "table", "views", "refs", "spans", "batch", "nbytes", "attempts", "stage",
                 "staged_at", "pin")

    def __init__(self, kind: int, table: list[int], views: list, refs: Sequence[int], batch: Batch,
                 nbytes: int, spans: list[int] | None = None, pin: Pin | None = None) -> None:
        """``table``: flat, two numbers an entry (remote addr, length) or three for attach frames (and the
        local address). ``refs``: the batch indices of the requests carried, in entry order. ``spans``:
        how many of them each entry carries, when entries merge adjacent requests (None: one each).
        ``pin``: an attach frame's local buffers, for a lane that dies with it unanswered to hold."""
        self.kind = kind
        self.req_id = next(_req_ids)
        self.table = table
        self.views = views
        self.refs = refs
        self.spans = spans
        self.batch = batch
        self.nbytes = nbytes
        self.attempts = 1
        self.stage: Stage | None = None  # when some local ranges are GPU memory
        self.staged_at: list[int] = []  # which entries the stage carries
        self.pin = pin


def bounds(lengths: list[int], max_bytes: int, max_entries: int) -> Iterator[tuple[int, int, int]]:
    """Cut requests of ``lengths`` into frames of at most ``max_entries`` requests, each closed once it
    reaches ``max_bytes``: ``(start, end, nbytes)`` per frame, requests ``start:end``."""
    start = nbytes = 0
    count = len(lengths)
    for i, n in enumerate(lengths):
        nbytes += n
        if nbytes >= max_bytes or i + 1 - start >= max_entries or i + 1 == count:
            yield start, i + 1, nbytes
            start, nbytes = i + 1, 0


def _flat(addrs: list[int], lengths: list[int]) -> list[int]:
    """``[addrs[0], lengths[0], addrs[1], ...]``: a WRITE/READ frame's table."""
    if len(addrs) == 1:
        return [addrs[0], lengths[0]]
    table = [0] * (2 * len(addrs))
    table[0::2] = addrs
    table[1::2] = lengths
    return table


def requests(items: list[WorkItem], batch: Batch, slice_size: int, max_bytes: int,
             max_entries: int) -> list[tuple[OutFrame, list[Staged]]]:
    """READ frames, then WRITE frames, for ``items``, each with the GPU ranges it stages.

    A request longer than ``slice_size`` is cut in slices (so several lanes carry it); a frame closes at
    ``max_bytes`` or ``max_entries``. The view of a GPU range is an index into the list of staged ranges
    that comes with its frame: the sender takes a stage and puts its views there.
    """
    out: list[tuple[OutFrame, list[Staged]]] = []
    for kind in (READ, WRITE):
        write = kind == WRITE
        table: list[int] = []  # addr, length, addr, length, ...
        views: list = []
        refs: list[int] = []
        staged: list[Staged] = []
        nbytes = 0
        for index, req, local, _ in items:
            if bool(req.op) != write:
                continue
            length = req.length
            if length <= slice_size:
                pieces: Iterable[tuple[int, int, int]] = ((req.remote_addr, req.local_addr, length),)
            else:
                pieces = [(req.remote_addr + off, req.local_addr + off, min(slice_size, length - off))
                          for off in range(0, length, slice_size)]
            for remote_addr, local_addr, n in pieces:
                table += (remote_addr, n)
                if local.is_host:
                    views.append(local.view(local_addr, n))
                else:
                    views.append(len(staged))
                    staged.append((local_addr, n, int(local.location.split(":")[1])))
                refs.append(index)
                nbytes += n
                if nbytes >= max_bytes or len(refs) >= max_entries:
                    out.append((OutFrame(kind, table, views, refs, batch, nbytes), staged))
                    table, views, refs, staged, nbytes = [], [], [], [], 0
        if refs:
            out.append((OutFrame(kind, table, views, refs, batch, nbytes), staged))
    return out


def arrays(kind: int, local_addrs: list[int], remote_addrs: list[int], lengths: list[int],
           view: Callable[[int, int], memoryview], batch: Batch, total: int, max_bytes: int,
           max_entries: int) -> list[OutFrame]:
    """WRITE or READ frames for arrays of host ranges (``total`` bytes), none longer than a slice: one frame
    when the limits allow, with one entry when the ranges are adjacent."""
    count = len(lengths)
    if total <= max_bytes and count <= max_entries:  # the usual case: the whole batch is one frame
        if count == 1 or contiguous(local_addrs, remote_addrs, lengths):  # one range: one entry
            return [OutFrame(kind, [remote_addrs[0], total], [view(local_addrs[0], total)], range(count), batch,
                             total, None if count == 1 else [count])]
        return [OutFrame(kind, _flat(remote_addrs, lengths), [view(a, n) for a, n in zip(local_addrs, lengths)],
                         range(count), batch, total)]
    views = [view(a, n) for a, n in zip(local_addrs, lengths)]
    return [OutFrame(kind, _flat(remote_addrs[start:end], lengths[start:end]), views[start:end],
                     range(start, end), batch, nbytes)
            for start, end, nbytes in bounds(lengths, max_bytes, max_entries)]


def ranges(kind: int, remote_addrs: list[int], lengths: list[int], views: list[memoryview], refs: list[int],
           batch: Batch) -> OutFrame:
    """One WRITE or READ frame of the given ranges (another transport's requests carried over TCP)."""
    table = [0] * (2 * len(lengths))
    table[0::2] = remote_addrs
    table[1::2] = lengths
    return OutFrame(kind, table, views, refs, batch, sum(lengths))


def attach_requests(items: list[WorkItem], batch: Batch, registry: MemoryRegistry, max_bytes: int,
                    max_entries: int) -> list[OutFrame]:
    """PUSH (READ) frames, then PULL (WRITE) frames, for ``items``: entries (remote addr, length, local
    addr), the views kept for a TCP fallback, and a :class:`Pin` of each frame's distinct local buffers."""
    out: list[OutFrame] = []
    for kind in (PUSH, PULL):
        pull = kind == PULL
        table: list[int] = []
        views: list = []
        refs: list[int] = []
        bufs: list[Buffer] = []  # the frame's distinct local buffers (mostly one)
        last = None
        nbytes = 0
        for index, req, local, _ in items:
            if bool(req.op) != pull:
                continue
            table += (req.remote_addr, req.length, req.local_addr)
            views.append(local.view(req.local_addr, req.length))
            refs.append(index)
            nbytes += req.length
            if local is not last:
                last = local
                if local not in bufs:
                    bufs.append(local)
            if nbytes >= max_bytes or len(refs) >= max_entries:
                out.append(OutFrame(kind, table, views, refs, batch, nbytes, pin=Pin(registry, bufs)))
                table, views, refs, bufs, last, nbytes = [], [], [], [], None, 0
        if refs:
            out.append(OutFrame(kind, table, views, refs, batch, nbytes, pin=Pin(registry, bufs)))
    return out


def attach_arrays(kind: int, local_addrs: list[int], remote_addrs: list[int], lengths: list[int], local: Buffer,
                  batch: Batch, registry: MemoryRegistry, max_bytes: int, max_entries: int) -> list[OutFrame]:
    """PULL or PUSH frames straight from arrays of ranges in one local buffer, as few as the limits allow."""
    view = local.view
    count = len(lengths)
    if count == 1 or (count <= max_entries and contiguous(local_addrs, remote_addrs, lengths)
                      and sum(lengths) <= max_bytes):  # one range (a lone request, or adjacent ones): one entry
        n = sum(lengths)
        return [OutFrame(kind, [remote_addrs[0], n, local_addrs[0]], [view(local_addrs[0], n)], range(count),
                         batch, n, None if count == 1 else [count], Pin(registry, [local]))]
    out = []
    for start, end, nbytes in bounds(lengths, max_bytes, max_entries):
        table = [0] * (3 * (end - start))
        table[0::3], table[1::3], table[2::3] = remote_addrs[start:end], lengths[start:end], local_addrs[start:end]
        views = [view(a, m) for a, m in zip(local_addrs[start:end], lengths[start:end])]
        out.append(OutFrame(kind, table, views, range(start, end), batch, nbytes, pin=Pin(registry, [local])))
    return out


def without_attach(frame: OutFrame, entries: list[tuple[int, list[int]]]) -> OutFrame:
    """A WRITE (for a PULL) or READ (for a PUSH) frame carrying ``entries`` of the attach frame ``frame``
    (each with the batch indices of its requests) over TCP: the target refused to attach."""
    table = frame.table
    flat: list[int] = []
    refs: list[int] = []
    for k, mine in entries:
        flat += (table[3 * k], table[3 * k + 1])
        refs += mine
    return OutFrame(WRITE if frame.kind == PULL else READ, flat, [frame.views[k] for k, _ in entries],
                    refs, frame.batch, sum(flat[1::2]),
                    None if frame.spans is None else [len(mine) for _, mine in entries])
