"""The transfer engine: registered memory, segments, and batches over pluggable transports."""

from __future__ import annotations

import logging
import operator
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from operator import add, index
from typing import Any

from . import gpu, metrics
from . import metadata as md
from .batch import Batch, Op, Request, RequestStatus, State
from .config import EngineConfig, check_timeout
from .errors import (
    ConfigError,
    MemoryAccessError,
    MoonletError,
    ProtocolError,
    RegistrationError,
    SegmentError,
    TransferError,
)
from .memory import (
    Buffer,
    MemoryRegistry,
    PeerMapping,
    SharedMemory,
    address_of,
    check_range,
    host_numa_node,
    parse_location,
    view_at,
)
from .metrics import Meter
from .security import Security
from .segment import RemoteBuffer, Segment, SegmentDescriptor, host_identity, new_instance_id, pid_namespace
from .transport import registry
from .transport.base import HostContext, Transport, WorkItem

log = logging.getLogger("moonlet")

_NOTE_MAX = 32 * 1024  # characters of name + message of one notification
_NOTES_KEPT = 65536  # unread notifications an engine queues before refusing more
_NOTES_BYTES = 16 << 20  # memory the unread notifications may hold before more are refused

def available_transports() -> tuple[str, ...]:
    """The transports this host can run, in the default order of preference."""
    return registry.available()


#: The warning an engine logs once when transports of its order are missing here (a filter can match on it).
TRANSPORT_SKIPPED_WARNING = "engine %s runs without transport(s) this host lacks (%s); using %s"

_READ, _WRITE = Op.READ, Op.WRITE  # module globals: the array submit tests them per call
_NO_SEGMENT = object()  # what submit's loop has resolved before the first request: no segment reference at all

#: The warning an engine without a cluster secret logs, once per process (a filter can match on it).
NO_SECRET_WARNING = ("engine %s has NO cluster secret: any process that reaches %s can read and write its "
                     "registered memory; set MOONLET_SECRET (or EngineConfig.secret_file) on every engine")
_no_secret_warned = threading.Lock()  # taken once, by the first engine without a secret, and never released


def _warn_no_secret(name: str, endpoint: str) -> None:
    """Log :data:`NO_SECRET_WARNING` for the first engine of this process that has no secret."""
    if _no_secret_warned.acquire(blocking=False):
        log.warning(NO_SECRET_WARNING, name, endpoint)


def _is_pair(value: Any) -> bool:
    """Whether ``value`` looks like one ``(address, length)`` pair rather than a sequence of targets."""
    return isinstance(value, tuple) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value)


def _as_list(seq: Sequence[int]) -> list[int]:
    """``seq`` (a numpy array, a tuple...) as a list of Python ints."""
    return list(seq.tolist() if hasattr(seq, "tolist") else seq)


class TransferEngine:
    """Moves bytes between this process's registered memory and other engines'.

    ``metadata`` says where segment descriptors live: ``"p2p"`` (no server;
    the engine's name is its listener's ``host:port``), an HTTP metadata
    server URL, ``etcd://...`` or ``redis://...`` (the engine is published
    under ``name``).
    """

    def __init__(self, name: str | None = None, metadata: str = "p2p", *,
                 config: EngineConfig | None = None, **overrides: Any) -> None:
        if config is None:  # explicit overrides, then MOONLET_<FIELD> variables, then defaults
            cfg = EngineConfig.from_env(**overrides)
        else:  # a config object is taken as it is: the environment does not change it
            cfg = config.with_(**overrides) if overrides else config
        self.config = cfg
        self._registry = MemoryRegistry()
        self._instance = new_instance_id()
        self._host = host_identity()
        security = Security.from_config(cfg)
        self._meta = md.connect(metadata, cfg.metadata_timeout, cfg.metadata_ttl, security)
        if not self._meta.names_are_endpoints:
            if not name or any(c.isspace() for c in name) or "/" in name:
                raise ConfigError(f"engine name must be a non-empty string without spaces or '/', got {name!r}")
        self._segments: dict[str, Segment] = {}
        self._stale: set[str] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._live: set[Batch] = set()  # batches not ended yet (each pins its local buffers): close() ends them
        self._pidns = pid_namespace()
        self._watches: dict[str, tuple[str, PeerMapping]] = {}  # segment name -> (instance, mapping)
        wanted, skipped = self._pick_transports(cfg)
        # Same-host peers map this page to learn at once when an unregister made their cache stale. Only where
        # the kernel keeps them from writing it (sealed): a peer could otherwise fake or hide unregisters.
        self._generation = 0
        control = SharedMemory(8, self._instance, remote_write=False) if hasattr(os, "memfd_create") else None
        if control is not None and control.share() is None:
            control.release()
            control = None
        self._control = control
        self._notes: deque[tuple[str, str]] = deque()
        self._notes_size = 0  # bytes the unread notes hold
        self._notes_lock = threading.Lock()
        self._meter: Meter | None = None  # made when metrics are first asked for (served or registered)
        self._metrics_server: Any = None
        self._collectors: list[metrics.Collector] = []  # that report this engine (it leaves them at close)
        #: where this engine serves its Prometheus metrics (``EngineConfig.metrics_port``), or None
        self.metrics_url: str | None = None
        ctx = HostContext(cfg, self._registry, security, self._instance, self._host, self._pidns, wanted,
                          describe=self._descriptor_json, descriptor=lambda: self.descriptor().to_dict(),
                          identity=self._identity, on_stale=self._stale.add, on_note=self._queue_note,
                          on_fallback=self._fallback)
        try:
            wanted, skipped = self._start_transports(ctx, wanted, skipped)
        except BaseException:
            self._meta.close()
            if self._control is not None:
                self._control.release()
            raise
        listener = self._listener = ctx.started[next(s.name for s in registry.TRANSPORTS if s.listener)]
        self._endpoint = str(listener.endpoint())  # the listener's host:port: the engine's address
        self._name = self._endpoint if self._meta.names_are_endpoints else str(name)
        if skipped:  # one warning per engine, naming every transport left out and why
            log.warning(TRANSPORT_SKIPPED_WARNING, self._endpoint, "; ".join(skipped), list(wanted))
        self._all_transports = list(ctx.started.values())
        for t in self._all_transports:
            self._meta = t.wrap_metadata(self._meta)
        self._transports = [ctx.started[t] for t in wanted]
        try:
            self._publish()
        except MoonletError:
            self._close_transports()
            if self._control is not None:
                self._control.release()
            raise
        if security.secret is None:
            _warn_no_secret(self._name, self._endpoint)
        self._stop = threading.Event()
        if cfg.metrics_port is not None:
            try:
                self._metrics_server, self.metrics_url = metrics.serve(self, cfg.listen_host, cfg.metrics_port)
            except ConfigError:
                self.close()
                raise
        if self._meta.leased:
            threading.Thread(target=self._keepalive, name="moonlet-metadata-keepalive", daemon=True).start()

    def stats(self) -> dict[str, int]:
        """Counters since start: TCP connections opened and frames retried on another connection,
        RDMA queue pairs connected and slices re-posted after a queue pair error."""
        out: dict[str, int] = {}
        for t in self._all_transports:
            out.update(t.stats())
        return out

    def _join_metrics(self, collector: metrics.Collector) -> None:
        """Be reported by ``collector`` until this engine closes; counting starts with the first."""
        with self._lock:
            if self._meter is None:
                self._meter = metrics.Meter()
            self._collectors.append(collector)
        collector.add(id(self), metrics.Source(self._name, self._meter, self._gauges))

    def _gauges(self) -> dict[str, Any]:
        """What the metrics read at scrape time: connections per transport, registered bytes per location,
        open segments."""
        registered: dict[str, int] = {}
        for buf in self._registry.buffers():
            registered[buf.location] = registered.get(buf.location, 0) + buf.length
        return {"connections": {t.name: t.connections() for t in self._all_transports},
                "registered": registered, "peers": len(self._segments)}

    def _fallback(self, source: str, target: str, reason: str, count: int) -> None:
        meter = self._meter
        if meter is not None:
            meter.fallback(source, target, reason, count)

    def _keepalive(self) -> None:
        """Renew the descriptor's lease every third of its TTL; say once when the store is down, and when back."""
        down = False
        while not self._stop.wait(self.config.metadata_ttl / 3):
            try:
                self._meta.keepalive()
            except MoonletError as e:
                if not down:
                    log.warning("metadata store unreachable, transfers go on with known peers: %s", e)
                down = True
                continue
            if down:
                log.warning("metadata store reachable again; descriptor of %s renewed", self._name)
                down = False

    # -- identity and metadata ---------------------------------------------------

    @property
    def name(self) -> str:
        """The segment name peers pass to :meth:`open_segment`."""
        return self._name

    @property
    def metadata(self) -> str:
        """Where this engine's descriptor is published (``p2p``, or the store's URL)."""
        return str(self._meta)

    def _identity(self) -> dict[str, Any]:
        """Who we are to peers (HELLO), and what our cluster-secret proofs cover (name and TCP endpoint)."""
        return {"name": self._name, "instance": self._instance, "host": self._host, "pidns": self._pidns,
                "endpoint": self._endpoint}

    def descriptor(self) -> SegmentDescriptor:
        """This engine's current segment descriptor."""
        endpoints: dict[str, str] = {}
        fields: dict[str, Any] = {}
        for t in self._all_transports:
            endpoints.update(t.published())
            fields.update(t.descriptor_fields())
        return SegmentDescriptor(
            name=self._name,
            instance=self._instance,
            host=self._host,
            pid=os.getpid(),
            endpoints=endpoints,
            buffers=[b.describe() for b in self._registry.buffers()],
            pidns=self._pidns,
            generation=self._generation,
            control={"memfd": self._control.fd, "addr": self._control.addr} if self._control else None,
            **fields,
        )

    @staticmethod
    def _pick_transports(cfg: EngineConfig) -> tuple[tuple[str, ...], list[str]]:
        """The transports to start, in order, and why those this host lacks were left out.

        An order may name transports this host cannot run (``cuda_ipc``, ``shm``, ``rdma`` without the
        hardware): they are skipped (the engine warns, naming why). A transport's policy decides the rest
        (``cfg.rdma`` for RDMA): "off" never starts it, "required" refuses to start without it, "auto" uses it
        where it can run; an ``announce`` transport is in the default order even where it cannot run, so that
        its absence is said, not silent. :class:`ConfigError` for unknown names, a missing required
        transport, or an order nothing of is left of.
        """
        specs = registry.by_name()
        here = registry.available()
        named = registry.default_order()
        default = tuple(t for t in named if t in here or specs[t].announce)
        order = tuple(t for t in (cfg.transports or default) if t not in specs or specs[t].policy(cfg) != "off")
        unknown = [t for t in order if t not in named]
        if unknown:
            raise ConfigError(f"unknown or unavailable transport(s) {unknown}; available here: {list(here)}")
        for t in named:
            if specs[t].policy(cfg) == "required" and t not in order:
                raise ConfigError(f"{t}='required' but the transport order leaves {t.upper()} out: "
                                  f"{list(cfg.transports)}")
        why = {t: specs[t].missing(cfg) for t in order}
        missing = [t for t in order if why[t]]
        for t in missing:
            if specs[t].policy(cfg) == "required":
                raise ConfigError(f"{t}='required' but {t.upper()} cannot start: {why[t]}")
        wanted = tuple(t for t in order if t not in missing)
        detail = "; ".join(f"{t}: {why[t]}" for t in missing)
        if not wanted:
            raise ConfigError(f"unknown or unavailable transport(s) {missing} ({detail}); "
                              f"available here: {list(here)}")
        wanted += tuple(spec.name for spec in registry.TRANSPORTS if spec.extra is not None and spec.extra(cfg))
        return wanted, [f"{t}: {why[t]}" for t in missing]

    @staticmethod
    def _start_transports(ctx: HostContext, wanted: tuple[str, ...],
                          skipped: list[str]) -> tuple[tuple[str, ...], list[str]]:
        """Start the listener, then each transport of ``wanted`` (into ``ctx.started``); one that fails to
        start is left out, named in the skipped list, unless it is required or nothing else is left."""
        for spec in sorted(registry.TRANSPORTS, key=lambda spec: not spec.listener):
            if not spec.listener and spec.name not in wanted:
                continue
            try:
                ctx.started[spec.name] = spec.start(ctx)
            except (OSError, MoonletError) as e:
                specs = registry.by_name()
                rest = tuple(t for t in wanted if t != spec.name and specs[t].extra is None)
                if spec.listener or spec.policy(ctx.config) == "required" or not rest:
                    for t in ctx.started.values():
                        t.close()
                    if spec.listener or isinstance(e, ConfigError):  # no address (port taken...); a config
                        raise  # error names the problem itself
                    raise ConfigError(f"{spec.name.upper()} transport cannot start: {e}") from None
                wanted, skipped = rest, [*skipped, f"{spec.name}: {e}"]
                ctx.order = wanted
        return wanted, skipped

    def _descriptor_json(self) -> bytes:
        """Our descriptor as published and served peer to peer: sealed with the cluster secret, if set."""
        return self._meta.seal(self._name, self.descriptor().to_json())

    def _publish(self) -> None:
        if self._meta.keeps_descriptors:
            self._meta.publish(self._name, self._descriptor_json())

    # -- memory ------------------------------------------------------------------

    def register(self, target: Any, length: int | None = None, location: str | None = None, *,
                 remote_read: bool = True, remote_write: bool = True) -> Buffer:
        """Register memory so transfers (and, with the rights given, peers) may use it.

        ``target`` is an address (``int``, with ``length``) or an object
        exposing the buffer protocol (bytearray, numpy array, mmap).
        ``location`` (``"cpu:N"``) is detected when not given.  All or nothing:
        if a transport or the metadata store refuses it, nothing stays registered.
        """
        self._check_open()
        buf = self._buffer(target, length, location, remote_read, remote_write)
        self._registry.add(buf)
        return self._offer([buf])[0]

    def register_many(self, targets: Sequence[Any], location: str | None = None, *, remote_read: bool = True,
                      remote_write: bool = True) -> list[Buffer]:
        """Register several memory ranges at once, as :meth:`register` does each (with the same
        ``location`` and rights for all), and publish the descriptor once rather than once per range: with a
        metadata store, registering n ranges one by one writes n ever longer descriptors.

        ``targets``: a sequence whose items are objects exposing the buffer protocol, or ``(address,
        length)`` / ``(object, length)`` pairs (tuples or lists). All or nothing: if one is refused, none
        stays registered, and the error names the item.
        """
        self._check_open()
        if isinstance(targets, (str, bytes, bytearray, memoryview)) or hasattr(targets, "__array_interface__") \
                or _is_pair(targets):
            raise RegistrationError("register_many takes a sequence of targets (objects or (address, length) "
                                    "pairs); to register one range, use register()")
        bufs: list[Buffer] = []
        try:
            for i, target in enumerate(targets):
                try:
                    if isinstance(target, (tuple, list)):
                        if len(target) != 2:
                            raise RegistrationError(f"{target!r} is not an (address, length) pair")
                        buf = self._buffer(target[0], target[1], location, remote_read, remote_write)
                    else:
                        buf = self._buffer(target, None, location, remote_read, remote_write)
                    self._registry.add(buf)
                except (MemoryAccessError, RegistrationError) as e:
                    raise type(e)(f"register_many: targets[{i}]: {e}") from None
                bufs.append(buf)
        except BaseException:
            self._withdraw(bufs)  # in the registry, not yet offered to any transport: nothing else to undo
            raise
        return self._offer(bufs) if bufs else []

    def _withdraw(self, bufs: list[Buffer]) -> None:
        """Take ``bufs`` out of the registry on the way out of a refused registration: each one, even if an
        earlier one could not be (a peer pinned it past ``request_timeout``), which is logged."""
        for buf in bufs:
            try:
                self._registry.remove(buf.addr, self.config.request_timeout, self._settle)
            except MoonletError as e:
                log.error("withdrawing [%#x, +%d) after a refused registration failed; it stays registered: %s",
                          buf.addr, buf.length, e)

    def _buffer(self, target: Any, length: int | None, location: str | None, remote_read: bool,
                remote_write: bool) -> Buffer:
        """The :class:`Buffer` that registering ``target`` makes (not yet in the registry)."""
        addr, length, location, keep, share = self._locate(target, length, location)
        if share and "ipc" in share and not (remote_read and remote_write):
            share = {"gpu": share["gpu"]}  # a CUDA IPC mapping is read-write: peers come through us, we check
        return Buffer(addr, length, location, remote_read, remote_write, keep, share=share)

    @staticmethod
    def _locate(target: Any, length: int | None,
                location: str | None) -> tuple[int, int, str, Any, dict[str, Any] | None]:
        """Address, length, location, keep-alive object and peer-sharing info of memory to register."""
        keep: Any = None
        share: dict[str, Any] | None = None
        if length is not None:
            try:
                if isinstance(length, bool):
                    raise TypeError
                length = operator.index(length)
            except TypeError:
                raise MemoryAccessError(f"length must be an integer, got {length!r}") from None
        if isinstance(target, int) and not isinstance(target, bool):
            if length is None:
                raise MemoryAccessError("registering a raw address needs a length")
            addr, size = target, length
            check_range(addr, length)
            if addr < 4096:
                raise MemoryAccessError(f"address {addr:#x} is in the never-mapped first page (a NULL pointer?)")
            gpu_info = gpu.pointer_info(addr) if (location or "cuda").startswith("cuda") and gpu.available() \
                else None
            device = gpu_info.device if gpu_info else None
        else:
            tensor = gpu.cuda_array(target) if hasattr(target, "__cuda_array_interface__") else None
            if tensor is not None:
                addr, size, device = tensor
                keep = target
            else:
                addr, size, keep = address_of(target)
                device = None
            if length is not None:
                if not 0 < length <= size:
                    raise MemoryAccessError(f"length {length} outside 1..{size}, the size of the object")
                size = length
        if device is not None:
            detected = f"cuda:{device}"
            if location is not None and location != detected:
                raise MemoryAccessError(f"location {location!r} given, but CUDA says the memory is on {detected}")
            info = gpu.pointer_info(addr)
            assert info is not None
            if addr + size > info.base + info.size:
                raise MemoryAccessError(f"range [{addr:#x}, +{size}) runs past its CUDA allocation "
                                        f"[{info.base:#x}, +{info.size})")
            share = {"gpu": gpu.device_uuid(device)}
            try:
                share.update(ipc=gpu.ipc_handle(info.base).hex(), ipc_base=info.base)
            except gpu.GpuError:
                pass  # e.g. cuMemCreate memory: peers reach it over TCP instead of CUDA IPC
            return addr, size, detected, keep, share
        if location is None:
            location = f"cpu:{host_numa_node(addr)}"
        kind, _ = parse_location(location)
        if kind != "cpu":
            raise MemoryAccessError(f"location {location!r}: no CUDA device memory at {addr:#x} "
                                    f"({'CUDA is available' if gpu.available() else gpu.unavailable_reason()})")
        return addr, size, location, keep, share

    def allocate(self, length: int, *, remote_read: bool = True, remote_write: bool = True) -> Buffer:
        """Allocate ``length`` bytes of registered host memory that same-host peers can map.

        Peers on this host copy into and out of such a buffer with a plain
        memcpy into a shared mapping (no round trip to this engine).  The
        rights hold there too: peers map a ``remote_write=False`` buffer
        read-only, and the kernel refuses them a writable mapping; a
        ``remote_read=False`` one is not offered for mapping at all (peers go
        through this engine, which checks every access).  The memory is
        released by :meth:`unregister`.
        """
        self._check_open()
        shared = SharedMemory(length, self._instance, remote_read, remote_write)
        try:
            buf = Buffer(shared.addr, length, f"cpu:{host_numa_node(shared.addr)}", remote_read, remote_write,
                         shared, share=shared.share())
            self._registry.add(buf)
        except BaseException:
            shared.release()
            raise
        return self._offer([buf])[0]

    def _offer(self, bufs: list[Buffer]) -> list[Buffer]:
        """Register ``bufs``, just added to the registry, with every transport and publish them once: all or
        nothing.

        If a transport or the metadata store refuses one, every buffer is withdrawn
        (registry, the transports that took it, an :meth:`allocate` buffer's
        memory) and the error re-raised, so the same call works once the cause
        is gone (no "already registered" from a half-done one).
        """
        taken: list[tuple[Buffer, list[Transport]]] = []
        try:
            for buf in bufs:
                took: list[Transport] = []
                taken.append((buf, took))
                for t in self._all_transports:
                    t.register(buf)
                    took.append(t)
            self._publish()
        except BaseException:
            # A peer may have seen them meanwhile (p2p descriptors are served live): withdraw as unregister does.
            self._withdraw(bufs)
            for buf, transports in taken:
                self._forget(buf, transports)
            try:
                self._publish()  # the store keeps (and keepalive renews) the last descriptor handed to it
            except MoonletError as e:
                log.info("descriptor of %s not republished after a refused registration: %s", self._name, e)
            for buf in bufs:
                if isinstance(buf.keepalive, SharedMemory):
                    buf.keepalive.release()
            raise
        return bufs

    def _forget(self, buf: Buffer, transports: list[Transport]) -> None:
        """Withdraw ``buf``, removed from the registry, from ``transports``, and tell same-host peers."""
        for t in transports:
            t.unregister(buf)
        self._generation += 1
        if self._control is not None:
            view_at(self._control.addr, 8)[:] = self._generation.to_bytes(8, "little")

    def unregister(self, buf: Buffer | int) -> None:
        """Unregister a buffer (by object or start address) once no transfer uses it; all or nothing.

        From the call on, no new transfer may use it (this engine's submits
        raise, peers' requests are refused).  This engine's batches using it are
        driven to their end, and those still moving ``config.request_timeout``
        after the call end TIMEOUT; peers' transfers in progress are waited for
        as long, and so are same-host targets that may still copy into or out
        of it (they copy when they read a request, which may be after its batch
        ended; a target is done once it answered, or closed the connection that
        carried the request).  If one still holds it then,
        :class:`RegistrationError` is raised and the buffer stays registered,
        exactly as before.
        """
        self._check_open()
        addr = buf.addr if isinstance(buf, Buffer) else buf
        removed = self._registry.remove(addr, self.config.request_timeout, self._settle)
        self._forget(removed, self._all_transports)
        self._publish()
        if isinstance(removed.keepalive, SharedMemory):
            removed.keepalive.release()

    def _settle(self, buf: Buffer, deadline: float) -> None:
        """Drive this engine's batches that pinned ``buf`` to their end (unregister), by ``deadline``."""
        for batch in [b for b in list(self._live) if buf in b.pinned]:
            batch.expire_at(deadline)
            batch.wait()

    def buffers(self) -> list[Buffer]:
        """The buffers registered now, by address."""
        return self._registry.buffers()

    # -- segments ------------------------------------------------------------------

    def open_segment(self, name: str) -> Segment:
        """Resolve a peer by segment name (cached; re-fetched when found stale)."""
        self._check_open()
        if not isinstance(name, str) or not name:
            raise SegmentError(f"segment name must be a non-empty string, got {name!r}")
        with self._lock:
            seg = self._segments.get(name)
        if seg is not None and name not in self._stale:
            return seg
        desc = self._fetch(name)
        with self._lock:
            seg = self._segments.get(name)
            if seg is None:
                seg = self._segments[name] = Segment(name, desc)
            else:
                seg.update(desc)
            self._stale.discard(name)
        self._watch(seg)
        return seg

    def _watch(self, seg: Segment) -> None:
        """Map a same-host peer's generation page, so unregisters there are seen before the next request."""
        d = seg.descriptor
        if not d.control or d.host != self._host or d.pidns != self._pidns or d.instance == self._instance:
            seg.watch = None
            return
        held = self._watches.get(seg.name)
        if held is not None and held[0] == d.instance:
            seg.watch = held[1]
            return
        if held is not None:
            held[1].close()  # the peer restarted
        try:
            mapping = PeerMapping(d, d.control["memfd"], d.control["addr"], 8)
        except (OSError, ValueError) as e:
            log.info("cannot watch %s's registrations (%s); stale entries are caught by the peer", seg.name, e)
            seg.watch = None
            return
        self._watches[seg.name] = (d.instance, mapping)
        seg.watch = mapping

    def _fetch(self, name: str) -> SegmentDescriptor:
        raw = self._meta.fetch(name)
        if raw is None:
            gone = " (peer gone? descriptors expire when their engine stops renewing them)" \
                if self._meta.leased else ""
            raise SegmentError(f"unknown segment {name!r}: no descriptor in metadata service {self._meta}{gone}")
        desc = SegmentDescriptor.from_json(raw)
        if desc.name != name:
            raise SegmentError(f"metadata for {name!r} describes segment {desc.name!r}")
        return desc

    def _refresh(self, seg: Segment) -> bool:
        """Re-fetch ``seg``'s descriptor; False if the peer cannot be asked right now."""
        try:
            seg.update(self._fetch(seg.name))
            self._stale.discard(seg.name)
            self._watch(seg)
            return True
        except MoonletError as e:
            log.info("could not refresh segment %s: %s", seg.name, e)
            return False

    def _segment(self, ref: object) -> Segment:
        if isinstance(ref, Segment):
            if ref.name in self._stale or ref.stale():
                self._refresh(ref)
            return ref
        if isinstance(ref, str):
            return self.open_segment(ref)
        raise SegmentError(f"segment must be a Segment from open_segment() or a segment name, got {ref!r}")

    # -- transfers -------------------------------------------------------------------

    def submit(self, requests: Iterable[Request], timeout: float | None = None) -> Batch:
        """Start a batch of requests; returns at once with a :class:`Batch` to wait on.

        Local mistakes (unregistered local memory, zero length, bad segment)
        raise before anything moves; remote refusals end the request FAILED.
        ``timeout`` (seconds, default ``config.request_timeout``) bounds the batch.
        """
        self._check_open()
        reqs = [r if type(r) is Request else Request(*r) for r in requests]
        timeout = self.config.request_timeout if timeout is None else check_timeout("timeout", timeout)
        now = time.monotonic()
        batch = Batch(reqs, now + timeout, self._expire)
        if self._meter is not None:
            batch.meter = (None, None, now)
        groups: dict[tuple[int, int], tuple[Transport, Segment, list[WorkItem]]] = {}
        routes: dict[tuple[int, int], Transport | None] = {}
        refreshed: set[str] = set()
        # One pass; the last local buffer, segment, remote buffer and group hit are kept in locals,
        # since the requests of a batch mostly share them (this loop is the hot path for small blocks).
        # ``local`` and ``seg`` are bound by the first request: its range is never inside the empty
        # [l_lo, l_hi), and its segment reference is never the sentinel.
        local: Buffer
        seg: Segment
        held: list[Buffer] = []  # the distinct local buffers, pinned while the batch runs
        l_lo = l_hi = r_lo = r_hi = 0
        ref_hit: object = _NO_SEGMENT
        remote: RemoteBuffer | None = None
        items: list[WorkItem] | None = None
        for i, r in enumerate(reqs):
            op, la, ref, ra, n = r
            if op is not Op.WRITE and op is not Op.READ:
                raise TransferError(f"request {i}: op must be Op.READ or Op.WRITE, got {op!r}")
            if type(la) is not int or type(ra) is not int or type(n) is not int or n <= 0 or la < 0 or ra < 0:
                try:
                    if type(la) is not int or type(ra) is not int or type(n) is not int:
                        la, ra, n = index(la), index(ra), index(n)  # numpy integers and the like
                        r = reqs[i] = Request(op, la, ref, ra, n)
                except TypeError:
                    pass  # check_range names the argument that is not an integer
                try:
                    check_range(la, n)
                    check_range(ra, n)
                except MemoryAccessError as e:
                    raise MemoryAccessError(f"request {i}: {e}") from None
            if la < l_lo or la + n > l_hi:
                local = self._registry.require(la, n, f"request {i}: local")
                l_lo, l_hi, items = local.addr, local.addr + local.length, None
                if local not in held:
                    held.append(local)
            if ref is not ref_hit:
                seg, ref_hit, remote, items = self._segment(ref), ref, None, None
            if remote is None or ra < r_lo or ra + n > r_hi:
                remote = seg.find(ra, n)
                if remote is None and seg.name not in refreshed:
                    refreshed.add(seg.name)
                    self._refresh(seg)  # the peer may have registered more: ask again once
                    remote = seg.find(ra, n)
                if remote is None:
                    batch.fail(i, f"remote range [{ra:#x}, +{n}) is not inside a registered "
                                  f"buffer of segment {seg.name!r}: {seg.miss(ra, n)}")
                    continue
                r_lo, r_hi, items = remote.addr, remote.end, None
            if items is None:
                items = self._route(batch, groups, routes, local, seg, remote)
                if items is None:
                    why = "; ".join(f"{t.name}: {w}" for t in self._transports
                                    if (w := t.why_not(local, seg.descriptor, remote)))
                    batch.fail(i, f"no enabled transport ({', '.join(t.name for t in self._transports)}) reaches "
                                  f"{remote.location} memory of {seg.name!r} from local "
                                  f"{local.location}" + (f" ({why})" if why else ""))
                    continue
            items.append((i, r, local, remote))
        if not batch.done:  # else every request failed here, and nothing is left to move
            self._hold(batch, held)
        elif self._meter is not None:  # ... but it counts
            self._release_metered(batch)
        for t, seg, work in groups.values():
            t.submit(seg, batch, work)
        return batch

    def submit_many(self, op: Op, segment: object, local_addrs: Sequence[int], remote_addrs: Sequence[int],
                    lengths: Sequence[int], timeout: float | None = None) -> Batch:
        """Array form of :meth:`submit`: one op and segment, parallel sequences of addresses and lengths.

        Lists or numpy arrays; request ``i`` of the batch is ``(local_addrs[i],
        remote_addrs[i], lengths[i])``.  When every local range lies in one
        registered buffer and every remote range in one peer buffer (the usual
        case: a KV cache, a weight tensor), the ranges are checked in bulk and
        the transport gets whole arrays, so many small blocks cost little
        Python each.  Otherwise this is :meth:`submit` of the same requests.
        """
        if self._closed or self._listener.failure():
            self._check_open()
        la = local_addrs if type(local_addrs) is list else _as_list(local_addrs)
        ra = remote_addrs if type(remote_addrs) is list else _as_list(remote_addrs)
        ln = lengths if type(lengths) is list else _as_list(lengths)
        n = len(la)
        if n != len(ra) or n != len(ln):
            raise ConfigError(f"local_addrs, remote_addrs and lengths differ in length: {n}, {len(ra)}, {len(ln)}")
        if op is not _WRITE and op is not _READ:
            raise TransferError(f"op must be Op.READ or Op.WRITE, got {op!r}")
        timeout = self.config.request_timeout if timeout is None else check_timeout("timeout", timeout)
        seg = self._segment(segment)
        route = self._bulk_route(seg, la, ra, ln) if n else None
        if route is None:
            return self.submit([Request(op, a, seg, b, n) for a, b, n in zip(la, ra, ln)], timeout)
        t, local, remote = route
        now = time.monotonic()
        batch = Batch(n, now + timeout, self._expire, t.drive)
        if self._meter is not None:
            batch.meter = (op, ln[:], now)  # a copy: the caller may reuse its list before the batch ends
        self._hold(batch, [local])
        t.submit_many(seg, batch, op, la, ra, ln, local, remote)
        return batch

    def _hold(self, batch: Batch, local: list[Buffer]) -> None:
        """Track ``batch`` with its distinct local buffers until it ends, so that :meth:`unregister` drives it
        to its end before it lets a buffer go (:meth:`_settle`) and :meth:`close` ends it. Raises
        MemoryAccessError when a buffer is being unregistered meanwhile (before anything moved).

        No lock and no counter: the batch is tracked before its buffers are checked, and ``unregister``
        marks a buffer draining before it looks at the tracked batches, so one of the two sees the other.
        """
        batch.hold(local, self._release if self._meter is None else self._release_metered)
        live = self._live
        live.add(batch)
        for buf in local:
            if buf._dead:
                live.discard(batch)
                raise MemoryAccessError(f"local buffer [{buf.addr:#x}, +{buf.length}) is being unregistered")
        if self._closed:  # close() ran meanwhile and may have missed it
            batch.end_all(State.FAILED, "engine closed")
            self._check_open()

    def _release(self, batch: Batch) -> None:
        """``batch`` ended (called once, under its lock): stop tracking it."""
        self._live.discard(batch)

    def _release_metered(self, batch: Batch) -> None:
        """:meth:`_release`, and count what the batch moved (metrics on)."""
        self._live.discard(batch)
        meter = self._meter
        if meter is not None and batch.meter[2]:  # submitted once counting had started
            try:
                meter.ended(batch)
            except Exception:  # noqa: BLE001 - counting must never break the end of a batch
                log.error("counting a batch for the metrics failed", exc_info=True)

    def _bulk_route(self, seg: Segment, la: list[int], ra: list[int],
                    ln: list[int]) -> tuple[Transport, Buffer, RemoteBuffer] | None:
        """The transport, local buffer and remote buffer that carry every request of an array submit,
        or None when the requests span several buffers (or are malformed: :meth:`submit` says how)."""
        if len(ln) == 1:
            size = ln[0]
            if size <= 0:
                return None
            lo, rlo, span, rspan = la[0], ra[0], size, size
        else:
            if min(ln) <= 0:
                return None
            lo, rlo = min(la), min(ra)
            span, rspan = max(map(add, la, ln)) - lo, max(map(add, ra, ln)) - rlo
        if lo < 0 or rlo < 0:
            return None
        local = self._registry.find(lo, span)
        remote = seg.find(rlo, rspan)
        if local is None or remote is None:
            return None
        t = self._pick(local, seg, remote)
        return None if t is None else (t, local, remote)

    def _pick(self, local: Buffer, seg: Segment, remote: RemoteBuffer) -> Transport | None:
        descriptor = seg.descriptor
        for t in self._transports:
            if t.reaches(local, descriptor, remote):
                return t
        return None

    def _route(self, batch: Batch, groups: dict[tuple[int, int], tuple[Transport, Segment, list[WorkItem]]],
               routes: dict[tuple[int, int], Transport | None], local: Buffer, seg: Segment,
               remote: RemoteBuffer) -> list[WorkItem] | None:
        """The work list of the transport that carries local -> remote, or None if none does."""
        key = (id(local), id(remote))
        if key in routes:
            t = routes[key]
        else:
            t = routes[key] = self._pick(local, seg, remote)
        if t is None:
            return None
        group = groups.get((id(t), id(seg)))
        if group is None:
            group = groups[(id(t), id(seg))] = (t, seg, [])
            batch.add_driver(t.drive)
        return group[2]

    def _expire(self, batch: Batch) -> None:
        for t in self._transports:
            t.expire(batch)

    def _one(self, op: Op, local_addr: int, segment: object, remote_addr: int, length: int,
             timeout: float | None) -> Batch:
        return self.submit([Request(op, local_addr, segment, remote_addr, length)], timeout)

    def write(self, local_addr: int, segment: object, remote_addr: int, length: int,
              timeout: float | None = None) -> RequestStatus:
        """Copy ``length`` bytes from local memory to the peer; raise :class:`TransferError` on failure."""
        return self._one(Op.WRITE, local_addr, segment, remote_addr, length, timeout).check()[0]

    def read(self, local_addr: int, segment: object, remote_addr: int, length: int,
             timeout: float | None = None) -> RequestStatus:
        """Copy ``length`` bytes from the peer into local memory; raise :class:`TransferError` on failure."""
        return self._one(Op.READ, local_addr, segment, remote_addr, length, timeout).check()[0]

    async def _one_async(self, op: Op, local_addr: int, segment: object, remote_addr: int, length: int,
                         timeout: float | None) -> RequestStatus:
        batch = self._one(op, local_addr, segment, remote_addr, length, timeout)
        status = (await batch)[0]
        if not status.ok:
            raise TransferError(f"{op.name} {status.state.name}: {status.reason}", [status])
        return status

    async def write_async(self, local_addr: int, segment: object, remote_addr: int, length: int,
                          timeout: float | None = None) -> RequestStatus:
        """asyncio form of :meth:`write`."""
        return await self._one_async(Op.WRITE, local_addr, segment, remote_addr, length, timeout)

    async def read_async(self, local_addr: int, segment: object, remote_addr: int, length: int,
                         timeout: float | None = None) -> RequestStatus:
        """asyncio form of :meth:`read`."""
        return await self._one_async(Op.READ, local_addr, segment, remote_addr, length, timeout)

    # -- notifications -------------------------------------------------------------------

    def notify(self, segment: object, name: str, message: str, timeout: float | None = None) -> None:
        """Deliver a short ``(name, message)`` note to the peer, e.g. "KV blocks of request 17 written".

        Send it after the transfers it announces have completed: it travels on
        its own connection and is queued by the peer until it calls
        :meth:`notifications`. Raises :class:`TransferError` if the peer did not take it.
        """
        self._check_open()
        if not isinstance(name, str) or not isinstance(message, str) or len(name) + len(message) > _NOTE_MAX:
            raise TransferError(f"a notification is two strings of at most {_NOTE_MAX} characters together")
        timeout = self.config.request_timeout if timeout is None else check_timeout("timeout", timeout)
        seg = self._segment(segment)
        for t in self._all_transports:
            if t.notify(seg.descriptor, name, message, timeout):
                return
        raise TransferError(f"notification to {seg.name} not delivered: no transport here carries notes to it "
                            f"(it publishes {sorted(seg.descriptor.endpoints)})")

    def notifications(self) -> list[tuple[str, str]]:
        """Notes peers sent with :meth:`notify` since the last call, oldest first (and forget them)."""
        with self._notes_lock:
            out = list(self._notes)
            self._notes.clear()
            self._notes_size = 0
        return out

    def _queue_note(self, name: object, msg: object) -> None:
        """Queue a note a peer sent (natively or over Mooncake's NOTIFY); a ProtocolError, which the sender
        is told, when it is malformed or too large or the unread notes are at their count or size limit."""
        if type(name) is not str or type(msg) is not str:
            raise ProtocolError("a notification needs string name and msg")
        if len(name) + len(msg) > _NOTE_MAX:
            raise ProtocolError(f"notification too large: name and message are {len(name) + len(msg)} "
                                f"characters, at most {_NOTE_MAX}")
        size = sys.getsizeof(name) + sys.getsizeof(msg)  # what the strings hold here (1 to 4 bytes a character)
        with self._notes_lock:
            if len(self._notes) >= _NOTES_KEPT or self._notes_size + size > _NOTES_BYTES:
                raise ProtocolError(f"notification queue full ({len(self._notes)} unread, {self._notes_size} "
                                    f"bytes; at most {_NOTES_KEPT} and {_NOTES_BYTES} bytes); the peer must "
                                    "call notifications()")
            self._notes.append((name, msg))
            self._notes_size += size

    # -- lifecycle ---------------------------------------------------------------------

    def _check_open(self) -> None:
        """Raise unless the engine takes new work: it is closed, or its listener's reactor died (a bug:
        peers can no longer reach it, so it says so rather than carry on half deaf)."""
        if self._closed:
            raise MoonletError("engine is closed")
        failure = self._listener.failure()
        if failure:
            raise MoonletError(f"engine is broken and must be closed: {failure}")

    def _close_transports(self) -> None:
        for t in self._all_transports:  # each in turn, whatever the one before raised
            try:
                t.close()
            except Exception:  # noqa: BLE001 - the other transports must still close
                log.error("closing transport %s failed", t.name, exc_info=True)

    def close(self) -> None:
        """Withdraw the descriptor, close connections and stop serving peers.

        Batches still moving end FAILED "engine closed" (threads waiting on them
        get those statuses), once the transports have stopped touching memory.
        """
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        for collector in self._collectors:
            collector.remove(id(self))
        try:
            self._meta.remove(self._name)
        except MoonletError as e:
            log.warning("could not withdraw descriptor of %s: %s", self._name, e)
        self._close_transports()
        for batch in list(self._live):
            batch.end_all(State.FAILED, "engine closed")
        self._meta.close()
        for seg in self._segments.values():
            seg.watch = None
        for _, mapping in self._watches.values():
            mapping.close()
        self._watches.clear()
        if self._control is not None:
            self._control.release()

    def __enter__(self) -> TransferEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TransferEngine({self._name!r}, metadata={self.metadata!r}, buffers={len(self._registry)})"


__all__ = ["TransferEngine", "available_transports"]
