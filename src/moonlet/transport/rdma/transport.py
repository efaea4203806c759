"""RDMA transport: one-sided RDMA WRITE / READ over RC queue pairs, straight from libibverbs.

Memory: every registered buffer becomes a memory region on every NIC here,
with remote rights as registered (a read-only buffer's region lacks
REMOTE_WRITE, so the NIC itself refuses peers' writes).  GPU memory is
registered through DMA-BUF or nvidia-peermem (see :mod:`.gpudirect`).  The
regions' rkeys are published with the buffer, best NIC first.

Connections: per (local NIC, peer NIC) an endpoint of ``config.rdma_qps`` RC
queue pairs, set up over the TCP listener with a CONNECT frame (QPN, PSN, GID,
LID, MTU each way; the smaller MTU is used).  That TCP connection lives as long
as the queue pair: when either side goes away, the other tears its QP down.

Data path: requests are cut into ``slice_size`` slices, striped over the NICs
nearest the local memory and spread over the endpoint's QPs; each submit posts
one chain of work requests per QP, signalled every ``_SIGNAL_EVERY`` requests
and at the chain's end.  One poller thread per NIC drains the completion queue,
spinning ``spin_us`` after traffic and otherwise sleeping on the completion
channel.  A failed work request puts its QP in error: it fails with the NIC's
reason, the requests behind it are flushed and posted again once on a fresh QP;
a batch past its deadline moves its QPs to error so no late byte lands.
"""

from __future__ import annotations

import ctypes as C
import logging
import os
import random
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from operator import itemgetter
from typing import Any

from ...batch import Batch, State
from ...errors import ProtocolError, TransferError
from ...memory import Buffer, Denied
from ...security import Security
from ...segment import RemoteBuffer, Segment, SegmentDescriptor
from ..base import HostContext, Transport, WorkItem
from ..spec import TransportSpec
from ..tcp import frames
from ..tcp import protocol as P
from ..tcp.dial import dial, read_control
from ..tcp.transport import TcpTransport
from . import gpudirect, verbs
from .nic import Nic, discover, load_matrix, tiers

log = logging.getLogger("moonlet.rdma")

_SIGNAL_EVERY = 16
_TARGET_QP_DEPTH = 4  # a target's QPs post nothing; one-sided requests need no receive queue
_REASONS = {
    verbs.WC_REM_ACCESS_ERR: "the peer's NIC refused access (bad rkey, range outside its registered region, "
                             "missing right, or the buffer was unregistered)",
    verbs.WC_RETRY_EXC_ERR: "no answer from the peer's NIC (retries exhausted): peer down or unreachable",
}

#: Where a slice comes from: (segment, local buffer, remote buffer), shared by the slices of a route.
Origin = tuple[Segment, Buffer, RemoteBuffer]
#: One slice in flight: (batch, request index, op, local addr, lkey, remote addr, rkey, length, attempt,
#: origin). A plain tuple, made per slice and unpacked with names where used.
Slice = tuple[Batch, int, int, int, int, int, int, int, int, Origin]
slice_batch = itemgetter(0)  # a slice's batch
_SGE_SIZE = C.sizeof(verbs.Sge)  # the stride of the scatter-gather array a chain points into
_WR_SIZE = C.sizeof(verbs.SendWR)  # ... and of the work-request array


def chunks(addr: int, length: int, most: int) -> list[tuple[int, int]]:
    """``[addr, +length)`` cut into equal memory-region pieces of at most ``most`` bytes (the last may be shorter)."""
    n = -(-length // most)
    size = span(length, n)
    return [(addr + i * size, min(size, length - i * size)) for i in range(n)]


def span(length: int, pieces: int) -> int:
    """Bytes per memory region of a buffer of ``length`` registered as ``pieces`` regions (both sides agree)."""
    return -(-length // pieces)


class _Qp:
    """An initiator queue pair, its control connection, and the slices it carries in posting order."""

    def __init__(self, qp: verbs.QueuePair, sock: socket.socket, endpoint: _Endpoint) -> None:
        self.qp = qp
        self.sock = sock
        self.endpoint = endpoint
        self.outstanding: deque[tuple[int, Slice]] = deque()
        self.backlog: deque[Slice] = deque()
        self.seq = 0
        self.broken = ""  # why this QP went to error

    def fail(self, why: str) -> None:
        if not self.broken:
            self.broken = why
            try:
                self.qp.to_error()
            except verbs.VerbsError as e:
                log.debug("moving QP %d to error: %s", self.qp.qpn, e)


class _Device:
    """One local NIC: its context, memory regions, completion queue and poller thread."""

    def __init__(self, nic: Nic, cfg) -> None:
        self.nic = nic
        ctx = nic.ctx
        assert ctx is not None  # discover() opened it
        self.ctx = ctx
        self.depth = min(cfg.rdma_queue_depth, self.ctx.max_qp_wr)
        self.cq_depth = min(self.ctx.max_cqe, 1 << 16)
        self.cq = verbs.CompletionQueue(self.ctx, self.cq_depth)
        self.rd_atomic = max(1, min(self.ctx.max_qp_rd_atom, 16))
        self.mrs: dict[int, list[verbs.MemoryRegion]] = {}  # buffer addr -> its regions, in address order
        self.qps: dict[int, _Qp] = {}  # qpn -> initiator QP
        self.targets: set[verbs.QueuePair] = set()
        self.inflight = 0  # posted work requests not yet known complete (bounded by the CQ depth)
        self.lock = threading.RLock()
        self.spin = cfg.spin_us / 1e6
        self.closed = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self.retry: list[tuple[_Endpoint, list[Slice]]] = []
        self.retried = 0  # slices re-posted after a queue pair error
        #: takes slices whose RDMA path is gone (another transport carries them); returns those it could not
        self.rescue: Callable[[list[Slice]], list[Slice]] = lambda slices: slices
        self.connected = 0  # queue pairs brought up as initiator
        self.thread = threading.Thread(target=self._run, name=f"moonlet-rdma-{nic.name}", daemon=True)
        self.thread.start()

    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    # -- posting ---------------------------------------------------------------

    def post(self, q: _Qp, slices: list[Slice]) -> None:
        """Post ``slices`` on ``q`` as one chain (what does not fit waits in its backlog)."""
        with self.lock:
            if q.backlog:
                q.backlog.extend(slices)
                return
            room = self._room(q)
            if room < len(slices):
                q.backlog.extend(slices[max(room, 0):])
                slices = slices[:max(room, 0)]
            if slices:
                self._post_chain(q, slices)

    def _room(self, q: _Qp) -> int:
        """Work requests ``q`` may take now: bounded by its send queue and by the shared CQ."""
        return min(self.depth - len(q.outstanding), self.cq_depth - self.inflight)

    def _post_chain(self, q: _Qp, slices: list[Slice]) -> None:
        n = len(slices)
        wrs = (verbs.SendWR * n)()
        sges = (verbs.Sge * n)()
        wr_base, sge_base = C.addressof(wrs), C.addressof(sges)
        seq = q.seq
        write, read, signaled = verbs.WR_RDMA_WRITE, verbs.WR_RDMA_READ, verbs.SEND_SIGNALED
        for i, (_, _, op, laddr, lkey, raddr, rkey, length, _, _) in enumerate(slices):
            sge = sges[i]
            sge.addr, sge.length, sge.lkey = laddr, length, lkey
            wr = wrs[i]
            wr.wr_id = seq + i
            wr.sg_list = sge_base + _SGE_SIZE * i
            wr.num_sge = 1
            wr.opcode = write if op else read
            wr.remote_addr, wr.rkey = raddr, rkey
            if i + 1 < n:
                wr.next = wr_base + _WR_SIZE * (i + 1)
                if (i + 1) % _SIGNAL_EVERY == 0:
                    wr.send_flags = signaled
            else:
                wr.send_flags = signaled
        if q.broken:
            self._fail_slices(slices, f"queue pair in error: {q.broken}")
            return
        try:
            q.qp.post(wrs[0])
        except verbs.VerbsError as e:
            self._fail_slices(slices, str(e))
            return
        q.outstanding.extend(zip(range(seq, seq + n), slices))
        q.seq = seq + n
        self.inflight += n

    def _fail_slices(self, slices: list[Slice], reason: str) -> None:
        for s in slices:
            self._end(s, False, reason)

    def _end(self, s: Slice, ok: bool, reason: str = "") -> None:
        batch, index, _, _, _, _, _, _, _, _ = s
        if ok:
            batch.part_done(index)
        elif time.monotonic() >= batch.deadline:
            batch.part_done(index, State.TIMEOUT, f"deadline passed ({reason})")
        else:
            batch.part_done(index, State.FAILED, reason)

    # -- completions -------------------------------------------------------------

    def _drain(self) -> int:
        got = 0
        with self.lock:
            for wc in self.cq.poll():
                got += 1
                q = self.qps.get(wc.qp_num)
                if q is not None:
                    self._completion(q, wc.wr_id, wc.status)
            if got:
                self._refill()
        return got

    def _completion(self, q: _Qp, seq: int, status: int) -> None:
        out = q.outstanding
        while out and out[0][0] < seq:  # completed without a signal of their own
            self._end(out.popleft()[1], True)
            self.inflight -= 1
        if not out or out[0][0] != seq:
            return
        s = out.popleft()[1]
        self.inflight -= 1
        if status == verbs.WC_SUCCESS:
            self._end(s, True)
            return
        if status == verbs.WC_WR_FLUSH_ERR:
            batch, index, op, laddr, lkey, raddr, rkey, length, attempt, origin = s
            if attempt < 2 and time.monotonic() < batch.deadline and not q.endpoint.gone:
                self._queue_retry(q.endpoint, (batch, index, op, laddr, lkey, raddr, rkey, length, attempt + 1,
                                               origin))
            else:
                self._end(s, False, f"flushed: {q.broken or 'queue pair in error'}")
        else:
            reason = _REASONS.get(status) or f"work completion error: {verbs.wc_status_str(status)}"
            q.fail(reason)
            self._end(s, False, f"{q.endpoint.peer}: {reason}")
        if not q.broken:
            q.fail(verbs.wc_status_str(status))

    def _queue_retry(self, ep: _Endpoint, s: Slice) -> None:
        self.retried += 1
        if self.retry and self.retry[-1][0] is ep:
            self.retry[-1][1].append(s)
        else:
            self.retry.append((ep, [s]))

    def _refill(self) -> None:
        """Post backlogged slices where room opened; retire broken QPs that have drained."""
        for qpn, q in list(self.qps.items()):
            if q.broken and not q.outstanding:
                del self.qps[qpn]
                for s in q.backlog:
                    self._queue_retry(q.endpoint, s)
                q.backlog.clear()
                q.endpoint.retire(q)
                continue
            if q.backlog:
                room = self._room(q)
                if room > 0:
                    chunk = [q.backlog.popleft() for _ in range(min(room, len(q.backlog)))]
                    self._post_chain(q, chunk)

    def _run(self) -> None:
        last = time.monotonic()
        while not self.closed:
            try:
                if self._drain():
                    last = time.monotonic()
                    self._flush_retries()
                    continue
                if time.monotonic() - last < self.spin:
                    continue
                self.cq.arm()
                if self._drain():
                    last = time.monotonic()
                    self._flush_retries()
                    continue
                self._sleep()
            except Exception:  # noqa: BLE001 - the poller must not die silently
                log.exception("RDMA poller of %s", self.nic.name)
                time.sleep(0.1)

    def _sleep(self) -> None:
        with self.lock:
            socks = {q.sock.fileno(): q for q in self.qps.values() if not q.broken}
        p = select.poll()
        p.register(self.cq.fd, select.POLLIN)
        p.register(self._wake_r, select.POLLIN)
        for fd in socks:
            p.register(fd, select.POLLIN)
        for fd, _ in p.poll(1000):
            if fd == self.cq.fd:
                self.cq.consume_event()
            elif fd == self._wake_r:
                try:
                    os.read(self._wake_r, 64)
                except BlockingIOError:
                    pass
            elif fd in socks:
                q = socks[fd]
                try:
                    alive = q.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
                except BlockingIOError:
                    alive = True
                except OSError:
                    alive = False
                if not alive:
                    with self.lock:
                        q.endpoint.gone = True
                        q.fail(f"{q.endpoint.peer} closed its control connection (peer gone)")

    def _flush_retries(self) -> None:
        with self.lock:
            retry, self.retry = self.retry, []
        for ep, slices in retry:
            try:
                ep.send(slices)
            except (OSError, ProtocolError, TransferError) as e:
                log.warning("RDMA path to %s via %s failed (%s); moving %d slice(s) to TCP where possible",
                            ep.peer, self.nic.name, e, len(slices))
                self._fail_slices(self.rescue(slices), f"retry after a queue pair error failed: {e}")

    def close(self) -> None:
        self.closed = True
        self.wake()
        self.thread.join(timeout=5)
        with self.lock:
            for q in list(self.qps.values()):
                q.fail("engine closed")
                self._fail_slices([s for _, s in q.outstanding] + list(q.backlog), "engine closed")
                q.qp.close()
                q.sock.close()
            self.qps.clear()
            for t in list(self.targets):
                t.close()
            self.targets.clear()
            for mrs in self.mrs.values():
                for mr in mrs:
                    mr.close()
            self.mrs.clear()
            self.cq.close()
            self.ctx.close()
        os.close(self._wake_r)
        os.close(self._wake_w)


class _Endpoint:
    """The queue pairs from one local NIC to one NIC of one peer engine."""

    def __init__(self, dev: _Device, peer: str, instance: str, control: str, nic: dict, count: int,
                 timeout: float, security: Security) -> None:
        self.dev = dev
        self.security = security
        self.peer = peer
        self.instance = instance
        self.control = control
        self.nic = nic
        self.count = count
        self.timeout = timeout
        self.qps: list[_Qp] = []
        self.gone = False
        self._rr = 0
        self._lock = threading.Lock()

    def live(self) -> list[_Qp]:
        return [q for q in self.qps if not q.broken]

    def ensure(self) -> list[_Qp]:
        """The endpoint's working QPs, connecting new ones where some are missing or broken."""
        with self._lock:
            live = self.live()
            while len(live) < self.count:
                q = self._connect()
                self.qps.append(q)
                live.append(q)
            return live

    def retire(self, q: _Qp) -> None:
        """Destroy a drained broken QP (called by the poller with the device lock held; no endpoint lock
        here, as :meth:`ensure` takes the two in the other order)."""
        try:
            self.qps.remove(q)
        except ValueError:
            pass
        q.qp.close()
        q.sock.close()

    def send(self, slices: list[Slice]) -> None:
        """Spread ``slices`` over the QPs and post them."""
        live = self.ensure()
        k = len(live)
        if k == 1 or len(slices) == 1:
            q = live[self._rr % k]
            self._rr += 1
            self.dev.post(q, slices)
            return
        per = [slices[i::k] for i in range(k)]
        for i, part in enumerate(per):
            if part:
                self.dev.post(live[(self._rr + i) % k], part)
        self._rr += 1

    def _connect(self) -> _Qp:
        dev = self.dev
        nic = dev.nic
        try:
            sock = dial(self.control, self.timeout, self.security)
        except OSError as e:
            self.gone = True
            raise TransferError(f"cannot reach peer {self.peer} at {self.control} to set up RDMA: {e}") from None
        except ProtocolError as e:
            raise TransferError(f"peer {self.peer} refused the RDMA control connection: {e}") from None
        qp = verbs.QueuePair(dev.ctx, dev.cq, dev.depth, nic.port)
        try:
            psn = random.getrandbits(24)
            sock.sendall(P.encode_connect({
                "service": "rdma", "name": self.peer, "instance": self.instance, "nic": self.nic["name"],
                "qpn": qp.qpn, "psn": psn, "gid": nic.gid.hex(), "lid": nic.lid, "mtu": nic.mtu}))
            reply = P.decode_connect(read_control(sock, P.CONNECT, "RDMA connect"))
            qp.connect(psn=psn, remote_qpn=int(reply["qpn"]), remote_psn=int(reply["psn"]),
                       remote_gid=bytes.fromhex(reply["gid"]), remote_lid=int(reply["lid"]),
                       gid_index=nic.gid_index, mtu=min(nic.mtu, int(reply["mtu"])), rd_atomic=dev.rd_atomic,
                       access=0)
        except (OSError, ProtocolError, KeyError, ValueError) as e:
            qp.close()
            sock.close()
            raise TransferError(f"RDMA handshake with peer {self.peer} ({self.nic['name']}) failed: {e}") from None
        sock.setblocking(False)
        self.gone = False
        q = _Qp(qp, sock, self)
        with dev.lock:
            dev.qps[qp.qpn] = q
            dev.connected += 1
        dev.wake()  # the poller watches the new control connection
        return q


class RdmaTransport(Transport):
    """One-sided RDMA to peers whose descriptors list RDMA NICs."""

    name = "rdma"

    def __init__(self, ctx: HostContext, tcp, nics: list[Nic], instance: str,
                 fallback: TcpTransport | None = None) -> None:
        cfg = self._cfg = ctx.config
        self._instance = instance
        self._security = ctx.security
        self._on_fallback = ctx.on_fallback
        self._tcp = tcp
        self._fallback = fallback
        self._devices = {n.name: _Device(n, cfg) for n in nics}
        for dev in self._devices.values():
            dev.rescue = self._rescue
        self._matrix = load_matrix(cfg.rdma_nic_matrix)
        self._gpu = gpudirect.GpuRegistration(cfg.rdma_gpu)
        self._endpoints: dict[tuple, _Endpoint] = {}
        self._lock = threading.Lock()
        self._order_cache: dict[str, list[list[_Device]]] = {}
        self._unregistered: dict[int, str] = {}  # buffer addr -> why a NIC refused to register it
        tcp.server.add_service("rdma", self._accept)

    @classmethod
    def open(cls, ctx: HostContext, tcp, instance: str, fallback: TcpTransport | None = None) -> RdmaTransport:
        """Discover the NICs (per config) and serve RDMA connects on ``tcp``'s listener."""
        nics, why = discover(ctx.config.rdma_devices, ctx.config.rdma_gid_index)
        if not nics:
            raise verbs.VerbsError(0, f"no usable RDMA NIC: {why}")
        return cls(ctx, tcp, nics, instance, fallback)

    def endpoint(self) -> str:
        return self._tcp.endpoint()

    def describe(self) -> list[dict]:
        """This engine's NICs, as published in the segment descriptor."""
        return [d.nic.describe() for d in self._devices.values()]

    def descriptor_fields(self) -> dict[str, Any]:
        return {"nics": self.describe()}

    # -- memory ----------------------------------------------------------------------

    def _order(self, location: str) -> list[list[_Device]]:
        devs = list(self._devices.values())
        gpu_path, gpu_numa = gpudirect.gpu_topology(location)
        groups = tiers(location, [d.nic for d in devs], self._matrix, gpu_path, gpu_numa)
        return [[self._devices[n.name] for n in g] for g in groups]

    def register(self, buf: Buffer) -> None:
        """Register ``buf`` with every NIC, in ``rdma_mr_chunk`` pieces registered in parallel.

        Pinning is the kernel's work and ctypes releases the GIL around it, so a
        buffer of hundreds of GB is pinned by several threads at once rather
        than one long call.
        """
        access = verbs.ACCESS_LOCAL_WRITE | (verbs.ACCESS_REMOTE_READ if buf.remote_read else 0) \
            | (verbs.ACCESS_REMOTE_WRITE if buf.remote_write else 0)
        order = self._order(buf.location)
        devs = [d for group in order for d in group]
        pieces = chunks(buf.addr, buf.length, self._cfg.rdma_mr_chunk)
        jobs = [(dev, a, n) for dev in devs for a, n in pieces]

        def reg(job: tuple) -> verbs.MemoryRegion | Exception:
            dev, a, n = job
            try:
                if not buf.is_host:
                    return self._gpu.register(dev.ctx, a, n, access)
                try:
                    return dev.ctx.reg_mr(a, n, access)
                except verbs.VerbsError:  # read-only pages (e.g. a bytes object): no local writes either
                    return dev.ctx.reg_mr(a, n, access & verbs.ACCESS_REMOTE_READ)
            except (verbs.VerbsError, gpudirect.GpuRegistrationError) as e:
                return e

        if len(jobs) > 1:
            with ThreadPoolExecutor(min(len(jobs), self._cfg.rdma_register_threads)) as pool:
                results = list(pool.map(reg, jobs))
        else:
            results = [reg(j) for j in jobs]
        rkeys: dict[str, list[int]] = {}
        for i, dev in enumerate(devs):
            mrs = results[i * len(pieces):(i + 1) * len(pieces)]
            bad = next((r for r in mrs if isinstance(r, Exception)), None)
            if bad is not None:
                for r in mrs:
                    if not isinstance(r, Exception):
                        r.close()
                log.info("buffer [%#x, +%d) on %s not registered with %s: %s; peers use another transport",
                         buf.addr, buf.length, buf.location, dev.nic.name, bad)
                self._unregistered[buf.addr] = f"{dev.nic.name} could not register it: {bad}"
                continue
            with dev.lock:
                dev.mrs[buf.addr] = mrs  # type: ignore[assignment]  # no exceptions left in it
            rkeys[dev.nic.name] = [mr.rkey for mr in mrs]  # type: ignore[union-attr]
        if rkeys:
            buf.share = {**(buf.share or {}), "rkeys": rkeys}
        self._order_cache[buf.location] = order

    def unregister(self, buf: Buffer) -> None:
        self._unregistered.pop(buf.addr, None)
        for dev in self._devices.values():
            with dev.lock:
                mrs = dev.mrs.pop(buf.addr, [])
            for mr in mrs:
                mr.close()

    # -- target side -------------------------------------------------------------------

    def _accept(self, body: dict) -> tuple[dict, Callable[[], None]]:
        """CONNECT from an initiator: make our half of the QP pair and bring it up."""
        ident = self._tcp.server.identity()
        if body.get("name") not in ("", ident["name"]) or body.get("instance") not in ("", ident["instance"]):
            raise ProtocolError(f"RDMA connect meant for {body.get('name')!r} (instance {body.get('instance')}), "
                                f"this is {ident['name']!r} (instance {ident['instance']})")
        dev = self._devices.get(str(body.get("nic")))
        if dev is None:
            raise ProtocolError(f"no RDMA NIC {body.get('nic')!r} here; have {sorted(self._devices)}")
        nic = dev.nic
        try:
            qp = verbs.QueuePair(dev.ctx, dev.cq, _TARGET_QP_DEPTH, nic.port)
        except verbs.VerbsError as e:
            raise ProtocolError(f"cannot create a queue pair: {e}") from None
        psn = random.getrandbits(24)
        try:
            qp.connect(psn=psn, remote_qpn=int(body["qpn"]), remote_psn=int(body["psn"]),
                       remote_gid=bytes.fromhex(body["gid"]), remote_lid=int(body["lid"]),
                       gid_index=nic.gid_index, mtu=min(nic.mtu, int(body["mtu"])), rd_atomic=dev.rd_atomic,
                       access=verbs.ACCESS_REMOTE_READ | verbs.ACCESS_REMOTE_WRITE)
        except (verbs.VerbsError, KeyError, ValueError, TypeError) as e:
            qp.close()
            raise ProtocolError(f"RDMA connect rejected: {e}") from None
        with dev.lock:
            dev.targets.add(qp)

        def cleanup() -> None:
            with dev.lock:
                dev.targets.discard(qp)
                qp.close()

        return {"qpn": qp.qpn, "psn": psn, "gid": nic.gid.hex(), "lid": nic.lid, "mtu": nic.mtu}, cleanup

    # -- initiator side ------------------------------------------------------------------

    def reaches(self, local: Buffer, peer: SegmentDescriptor, remote: RemoteBuffer) -> bool:
        return (bool(peer.nics) and "rdma" in peer.endpoints and bool(remote.rkeys)
                and peer.instance != self._instance and any(local.addr in d.mrs for d in self._devices.values()))

    def why_not(self, local: Buffer, peer: SegmentDescriptor, remote: RemoteBuffer) -> str:
        if local.addr in self._unregistered and not any(local.addr in d.mrs for d in self._devices.values()):
            return f"local buffer not registered with a NIC: {self._unregistered[local.addr]}"
        if peer.nics and not remote.rkeys:
            return f"{peer.name} registered that buffer with none of its NICs"
        return ""

    def _endpoint(self, dev: _Device, seg: Segment, nic: dict) -> _Endpoint:
        d = seg.descriptor
        key = (dev.nic.name, d.instance, nic["name"])
        with self._lock:
            ep = self._endpoints.get(key)
            if ep is None:
                ep = self._endpoints[key] = _Endpoint(dev, seg.name, d.instance, d.endpoints["rdma"], nic,
                                                      self._cfg.rdma_qps, self._cfg.connect_timeout, self._security)
        return ep

    def submit(self, segment: Segment, batch: Batch, items: list[WorkItem]) -> None:
        peer = segment.descriptor
        nics = {n["name"]: n for n in peer.nics}
        step = self._cfg.slice_size
        routes: dict[tuple[int, int], list | str] = {}
        plan: dict[int, tuple[_Endpoint, list[Slice]]] = {}
        counts: list[tuple[int, int]] = []
        fallback: list[WorkItem] = []
        origins: dict[tuple[int, int], tuple] = {}
        why = ""
        for item in items:
            index, req, local, remote = item
            if not (remote.remote_write if req.op else remote.remote_read):
                batch.fail(index, f"{segment.name} refused [{req.remote_addr:#x}, +{req.length}): "
                                  f"{Denied.REASONS[Denied.NO_PERMISSION]}")
                continue
            key = (id(local), id(remote))
            route = routes.get(key)
            if route is None:
                route = routes[key] = self._route(segment, local, remote, nics)
            if isinstance(route, str):
                fallback.append(item)
                why = route
                continue
            n = req.length
            op, la, ra = int(req.op), req.local_addr, req.remote_addr
            origin = origins.get(key)
            if origin is None:
                origin = origins[key] = (segment, local, remote)
            ep, lkeys, rkeys = route[0]
            if n <= step and len(lkeys) == 1 and len(rkeys) == 1:  # the common case: one slice, one region
                plan.setdefault(id(ep), (ep, []))[1].append(
                    (batch, index, op, la, lkeys[0], ra, rkeys[0], n, 1, origin))
                counts.append((index, 1))
                continue
            lspan, rspan = span(local.length, len(lkeys)), span(remote.length, len(rkeys))
            lo, ro = la - local.addr, ra - remote.addr
            off = k = 0
            while off < n:
                size = min(step, n - off, lspan - (lo + off) % lspan, rspan - (ro + off) % rspan)
                ep, lkeys, rkeys = route[k % len(route)]
                plan.setdefault(id(ep), (ep, []))[1].append(
                    (batch, index, op, la + off, lkeys[(lo + off) // lspan], ra + off, rkeys[(ro + off) // rspan],
                     size, 1, origin))
                off += size
                k += 1
            counts.append((index, k))
        if counts:
            batch.add_parts(counts, self.name)
        for ep, slices in plan.values():
            try:
                ep.send(slices)
            except TransferError as e:
                ep.dev._fail_slices(slices, str(e))
        if fallback:
            self._fall_back(segment, batch, fallback, why)

    def _route(self, segment: Segment, local: Buffer, remote: RemoteBuffer, nics: dict) -> list | str:
        """(endpoint, lkeys, rkeys) per stripe for local -> remote, or why no QP can be set up.

        The best tier of NICs for the local memory is striped over; when none
        of its NICs can reach the peer, the next tier is tried.
        """
        rkeys = remote.rkeys or {}
        rnames = [n for n in rkeys if n in nics]
        if not rnames:
            return f"{segment.name} registered this buffer with no NIC it publishes"
        why = f"no local NIC holds a memory region for {local.location} memory at {local.addr:#x}"
        for tier in self._order_cache.get(local.location) or self._order(local.location):
            out = []
            for i, dev in enumerate(d for d in tier if local.addr in d.mrs):
                rname = rnames[i % len(rnames)]
                ep = self._endpoint(dev, segment, nics[rname])
                try:
                    ep.ensure()
                except (TransferError, verbs.VerbsError) as e:
                    log.warning("RDMA to %s via %s unavailable: %s", segment.name, dev.nic.name, e)
                    why = str(e)
                    continue
                out.append((ep, [mr.lkey for mr in dev.mrs[local.addr]], rkeys[rname]))
            if out:
                return out
        return why

    def _rescue(self, slices: list[Slice]) -> list[Slice]:
        """Carry slices whose RDMA path failed mid-transfer over the TCP fallback; return those it cannot take.

        Each slice is one part of its request, exactly as a TCP frame entry is, so
        the request completes when its last part does, over whichever transport.
        """
        tcp = self._fallback
        if tcp is None:
            return slices
        left: list[Slice] = []
        groups: dict[tuple[int, int], tuple[Segment, list[Slice]]] = {}
        for s in slices:
            _, _, op, _, _, _, _, _, _, (seg, local, remote) = s
            if not local.is_host or not tcp.reaches(local, seg.descriptor, remote):
                left.append(s)
                continue
            groups.setdefault((id(seg), op), (seg, []))[1].append(s)
        for (_, op), (seg, group) in groups.items():
            by_batch: dict[int, tuple[Batch, list[Slice]]] = {}
            for s in group:
                by_batch.setdefault(id(slice_batch(s)), (slice_batch(s), []))[1].append(s)
            peer = tcp.peer(seg)
            for batch, parts in by_batch.values():
                refs = [index for _, index, *_ in parts]
                batch.set_transport(refs, tcp.name)
                self._on_fallback(self.name, tcp.name, "queue pair failed", len(set(refs)))
                batch.add_driver(tcp.drive)  # Batch.wait picks up drivers added while it waits
                views = [origin[1].view(laddr, length) for _, _, _, laddr, _, _, _, length, _, origin in parts]
                peer.send(frames.ranges(P.WRITE if op else P.READ, [raddr for _, _, _, _, _, raddr, *_ in parts],
                                        [length for _, _, _, _, _, _, _, length, _, _ in parts], views, refs, batch))
        return left

    def _fall_back(self, segment: Segment, batch: Batch, items: list[WorkItem], why: str) -> None:
        if self._fallback is not None and all(self._fallback.reaches(it[2], segment.descriptor, it[3])
                                              for it in items):
            batch.add_driver(self._fallback.drive)
            self._on_fallback(self.name, self._fallback.name, "no RDMA route", len(items))
            self._fallback.submit(segment, batch, items)
            return
        for index, *_ in items:
            batch.fail(index, f"no RDMA queue pair to {segment.name} could be set up ({why}), and no fallback "
                              f"transport is enabled")

    def stats(self) -> dict[str, int]:
        return {"rdma_qps_connected": sum(d.connected for d in self._devices.values()),
                "rdma_retries": sum(d.retried for d in self._devices.values())}

    def expire(self, batch: Batch) -> None:
        """Move every QP carrying a slice of ``batch`` to error: the flush ends those slices TIMEOUT."""
        for dev in self._devices.values():
            with dev.lock:
                for q in list(dev.qps.values()):
                    if any(slice_batch(s) is batch for _, s in q.outstanding):
                        q.fail("a batch on this queue pair passed its deadline")
                    if q.backlog:
                        keep = deque(s for s in q.backlog if slice_batch(s) is not batch)
                        dropped = [s for s in q.backlog if slice_batch(s) is batch]
                        q.backlog = keep
                        dev._fail_slices(dropped, "not yet posted")
            dev.wake()
        if self._fallback is not None:
            self._fallback.expire(batch)

    def drive(self, batch: Batch, block: bool) -> None:
        """Completions are handled by the per-NIC poller threads."""

    def close(self) -> None:
        for dev in self._devices.values():
            dev.close()
        self._devices.clear()


def missing(devices: tuple[str, ...]) -> str:
    """Why RDMA on ``devices`` (empty: any) cannot start here, or '' when it can."""
    why = verbs.unavailable_reason()
    absent = [d for d in devices if d not in verbs.device_names()] if not why else list(devices)
    if absent:
        return f"RDMA device(s) {absent} not found" + (f" ({why})" if why else f"; present: {verbs.device_names()}")
    return why


def _start(ctx: HostContext) -> RdmaTransport:
    """Serve RDMA connects on the listener; host memory to peers without a NIC goes over TCP if in the order."""
    tcp = ctx.started["tcp"]
    assert isinstance(tcp, TcpTransport)
    return RdmaTransport.open(ctx, tcp, ctx.instance, tcp if "tcp" in ctx.order else None)


SPEC = TransportSpec("rdma", _start, missing=lambda cfg: missing(cfg.rdma_devices), policy=lambda cfg: cfg.rdma,
                     announce=True)
