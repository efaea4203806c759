"""Mooncake's Python transfer-engine API on top of moonlet: change one import and keep your code.

    from moonlet.mooncake import TransferEngine   # was: from mooncake.engine import TransferEngine

Method names, arguments and return codes follow ``mooncake.engine.TransferEngine``
(0 on success, a negative number on failure; batch ids, 0 when an async batch
could not start).  The reason behind a failure, which Mooncake writes to its
log, is logged by ``moonlet.mooncake`` and kept in :attr:`TransferEngine.last_error`.
Differences, where Mooncake's behaviour would surprise its users, are listed
in ``docs/mooncake-compat.md``.

The engine also speaks Mooncake's wire (``EngineConfig.mooncake_wire``), so
Mooncake and moonlet nodes of one cluster reach each other, unless a cluster
secret is set (``$MOONLET_SECRET``): Mooncake peers cannot prove they hold
one, so then only moonlet peers are served.
"""

from __future__ import annotations

import enum
import itertools
import logging
import os
import socket
import threading
from collections.abc import Sequence

from ..batch import Batch, Op, Request, State
from ..config import EngineConfig
from ..engine import TransferEngine as _Engine
from ..engine import available_transports
from ..errors import MoonletError
from ..memory import view_at
from ..security import load_secret

log = logging.getLogger("moonlet.mooncake")


class TransferOpcode(enum.IntEnum):
    """Mooncake's opcode enum (same values as :class:`moonlet.Op`)."""

    Read = 0
    Write = 1
    READ = 0  # the spelling of Mooncake's documentation
    WRITE = 1


_Opcode = TransferOpcode  # the enum's name in annotations inside TransferEngine (its attribute shadows it there)


class TransferNotify:
    """A (name, msg) notification, as Mooncake passes them."""

    def __init__(self, name: str = "", msg: str = "") -> None:
        self.name = name
        self.msg = msg

    def __repr__(self) -> str:
        return f"TransferNotify({self.name!r}, {self.msg!r})"


def parse_metadata(server: str, kind: str | None = None) -> str:
    """A Mooncake ``metadata_server`` string (and ``initialize_ext``'s type) as a moonlet metadata spec."""
    s = server.strip()
    kind = (kind or "").lower()
    if s.upper() in ("P2PHANDSHAKE", "P2P") or kind == "p2p":
        return "p2p"
    if s.startswith(("http://", "https://", "etcd://", "redis://", "rediss://")):
        return s
    if kind in ("http", "redis", "etcd"):
        return f"{kind}://{s}"
    return f"etcd://{s}"  # Mooncake reads a bare host:port as an etcd endpoint


_PROTOCOLS = ("tcp", "rdma", "nvlink")


def _transports(protocol: str) -> tuple[str, ...]:
    """moonlet transports for a Mooncake protocol: "rdma" all of them (RDMA first, TCP as fallback); "tcp" and
    "nvlink" every one but RDMA, so same-host peers still get shared memory or CUDA IPC."""
    here = available_transports()
    return () if protocol == "rdma" else tuple(t for t in here if t != "rdma")


def _location(location: str) -> str | None:
    """Mooncake's location of memory to register as moonlet's: "*" (or nothing) means find it out."""
    return None if location in ("*", "") else location


class TransferEngine:
    """``mooncake.engine.TransferEngine``, backed by :class:`moonlet.TransferEngine`."""

    TransferOpcode = TransferOpcode

    def __init__(self) -> None:
        self._engine: _Engine | None = None
        self._batches: dict[int, Batch] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._managed: dict[int, int] = {}
        self.last_error = ""

    # -- setup -----------------------------------------------------------------------

    def initialize(self, local_hostname: str, metadata_server: str, protocol: str, device_name: str) -> int:
        """Start the engine: listen on ``local_hostname`` (``host`` or ``host:port``), publish to
        ``metadata_server``."""
        return self.initialize_ext(local_hostname, metadata_server, protocol, device_name, "")

    def initialize_ext(self, local_hostname: str, metadata_server: str, protocol: str, device_name: str,
                       metadata_type: str) -> int:
        if self._engine is not None:
            return self._fail("initialize called twice")
        host, _, port = local_hostname.rpartition(":") if ":" in local_hostname else (local_hostname, "", "0")
        proto = protocol.lower()
        if proto not in _PROTOCOLS:
            return self._fail(f"protocol {protocol!r} not supported; use 'tcp', 'rdma' or 'nvlink'")
        try:
            timeout = float(os.environ.get("MC_TRANSFER_TIMEOUT", "30"))
            cfg = EngineConfig(listen_host=_bind_address(host), advertise_host=host, port=int(port or 0),
                               request_timeout=timeout, transports=_transports(proto),
                               rdma_devices=tuple(d for d in device_name.split(",") if d) if proto == "rdma" else (),
                               mooncake_wire=load_secret(None, None) is None)
            spec = parse_metadata(metadata_server, metadata_type)
            self._engine = _Engine(None if spec == "p2p" else local_hostname, spec, config=cfg)
        except (MoonletError, ValueError, OSError) as e:
            return self._fail(f"initialize({local_hostname!r}, {metadata_server!r}) failed: {e}")
        return 0

    def get_rpc_port(self) -> int:
        eng = self._need()
        return int(eng.descriptor().endpoints["tcp"].rpartition(":")[2])

    @property
    def engine(self) -> _Engine:
        """The moonlet engine underneath, for code that wants moonlet's richer API."""
        return self._need()

    # -- memory ----------------------------------------------------------------------

    def register_memory(self, buffer_addr: int, capacity: int, location: str = "*") -> int:
        try:
            self._need().register(int(buffer_addr), int(capacity), _location(location))
        except MoonletError as e:
            return self._fail(f"register_memory({buffer_addr:#x}, {capacity}): {e}")
        return 0

    def unregister_memory(self, buffer_addr: int) -> int:
        try:
            self._need().unregister(int(buffer_addr))
        except MoonletError as e:
            return self._fail(f"unregister_memory({buffer_addr:#x}): {e}")
        return 0

    def batch_register_memory(self, buffer_addresses: Sequence[int], capacities: Sequence[int],
                              location: str = "*") -> int:
        if len(buffer_addresses) != len(capacities):
            return self._fail("buffer_addresses and capacities differ in length")
        try:  # all or nothing, and the descriptor published once
            self._need().register_many([(int(a), int(c)) for a, c in zip(buffer_addresses, capacities)],
                                       _location(location))
        except MoonletError as e:
            return self._fail(f"batch_register_memory({len(capacities)} buffers): {e}")
        return 0

    def batch_unregister_memory(self, buffer_addresses: Sequence[int]) -> int:
        rc = 0
        for addr in buffer_addresses:
            rc = self.unregister_memory(addr) or rc
        return rc

    def allocate_managed_buffer(self, length: int) -> int:
        """Registered host memory of ``length`` bytes (0 on failure); same-host peers map it directly."""
        try:
            buf = self._need().allocate(int(length))
        except MoonletError as e:
            self._fail(f"allocate_managed_buffer({length}): {e}")
            return 0
        self._managed[buf.addr] = buf.length
        return buf.addr

    def free_managed_buffer(self, buffer_addr: int, length: int) -> int:
        if self._managed.get(buffer_addr) != length:
            return self._fail(f"free_managed_buffer({buffer_addr:#x}, {length}): no managed buffer there "
                              f"of that length")
        del self._managed[buffer_addr]
        return self.unregister_memory(buffer_addr)

    def get_first_buffer_address(self, segment_name: str) -> int:
        """The lowest registered address of ``segment_name`` (0 when it has none or cannot be opened)."""
        try:
            bufs = self._need().open_segment(segment_name).buffers
        except MoonletError as e:
            self._fail(f"get_first_buffer_address({segment_name!r}): {e}")
            return 0
        return min((b.addr for b in bufs), default=0)

    def read_bytes_from_buffer(self, source_address: int, length: int) -> bytes:
        self._need()  # an initialized engine, as Mooncake requires
        return bytes(view_at(int(source_address), int(length)))

    def write_bytes_to_buffer(self, dest_address: int, src: bytes | str, length: int) -> int:
        data = src.encode() if isinstance(src, str) else bytes(src)
        if length > len(data):
            return self._fail(f"write_bytes_to_buffer: {length} bytes asked, {len(data)} given")
        view_at(int(dest_address), int(length))[:] = data[:length]
        return 0

    # -- transfers ---------------------------------------------------------------------

    def transfer_sync_write(self, target_hostname: str, buffer: int, peer_buffer_address: int, length: int,
                            transport_hint: str = "") -> int:
        return self.transfer_sync(target_hostname, buffer, peer_buffer_address, length, TransferOpcode.Write)

    def transfer_sync_read(self, target_hostname: str, buffer: int, peer_buffer_address: int, length: int,
                           transport_hint: str = "") -> int:
        return self.transfer_sync(target_hostname, buffer, peer_buffer_address, length, TransferOpcode.Read)

    def transfer_sync(self, target_hostname: str, buffer: int, peer_buffer_address: int, length: int,
                      opcode: _Opcode, notify: TransferNotify | None = None, transport_hint: str = "") -> int:
        return self.batch_transfer_sync(target_hostname, [buffer], [peer_buffer_address], [length], opcode, notify)

    def batch_transfer_sync_write(self, target_hostname: str, buffers: Sequence[int],
                                  peer_buffer_addresses: Sequence[int], lengths: Sequence[int],
                                  transport_hint: str = "") -> int:
        return self.batch_transfer_sync(target_hostname, buffers, peer_buffer_addresses, lengths,
                                        TransferOpcode.Write)

    def batch_transfer_sync_read(self, target_hostname: str, buffers: Sequence[int],
                                 peer_buffer_addresses: Sequence[int], lengths: Sequence[int],
                                 transport_hint: str = "") -> int:
        return self.batch_transfer_sync(target_hostname, buffers, peer_buffer_addresses, lengths,
                                        TransferOpcode.Read)

    def batch_transfer_sync(self, target_hostname: str, buffers: Sequence[int], peer_buffer_addresses: Sequence[int],
                            lengths: Sequence[int], opcode: _Opcode, notify: TransferNotify | None = None,
                            transport_hint: str = "") -> int:
        batch = self._submit(target_hostname, buffers, peer_buffer_addresses, lengths, opcode)
        if batch is None:
            return -1
        rc = self._outcome(batch.wait(), target_hostname)
        if rc == 0 and notify is not None:  # after the bytes landed, so the peer may read them on seeing it
            try:
                self._need().notify(target_hostname, notify.name, notify.msg)
            except MoonletError as e:
                return self._fail(str(e))
        return rc

    def batch_transfer_async_write(self, target_hostname: str, buffers: Sequence[int],
                                   peer_buffer_addresses: Sequence[int], lengths: Sequence[int],
                                   transport_hint: str = "") -> int:
        return self.batch_transfer_async(target_hostname, buffers, peer_buffer_addresses, lengths,
                                         TransferOpcode.Write)

    def batch_transfer_async_read(self, target_hostname: str, buffers: Sequence[int],
                                  peer_buffer_addresses: Sequence[int], lengths: Sequence[int],
                                  transport_hint: str = "") -> int:
        return self.batch_transfer_async(target_hostname, buffers, peer_buffer_addresses, lengths,
                                         TransferOpcode.Read)

    def batch_transfer_async(self, target_hostname: str, buffers: Sequence[int], peer_buffer_addresses: Sequence[int],
                             lengths: Sequence[int], opcode: _Opcode, transport_hint: str = "") -> int:
        """Start a batch; its id (0 when it could not start) goes to :meth:`get_batch_transfer_status`."""
        batch = self._submit(target_hostname, buffers, peer_buffer_addresses, lengths, opcode)
        return 0 if batch is None else self._keep(batch)

    def get_batch_transfer_status(self, batch_ids: Sequence[int]) -> int:
        """Wait for every batch in ``batch_ids``: 0 when all completed, -1 when one failed or timed out."""
        rc = 0
        for bid in batch_ids:
            with self._lock:
                batch = self._batches.pop(bid, None)
            if batch is None:
                rc = self._fail(f"unknown batch id {bid}")
                continue
            rc = self._outcome(batch.wait(), f"batch {bid}") or rc
        return rc

    def transfer_submit_write(self, target_hostname: str, buffer: int, peer_buffer_address: int, length: int,
                              transport_hint: str = "") -> int:
        """Start one WRITE; its id (-1 when it could not start) goes to :meth:`transfer_check_status`."""
        batch = self._submit(target_hostname, [buffer], [peer_buffer_address], [length], TransferOpcode.Write)
        return -1 if batch is None else self._keep(batch)

    def transfer_check_status(self, batch_id: int) -> int:
        """1 completed, 0 still moving, -1 failed, -2 timed out (the id is forgotten once it has ended)."""
        with self._lock:
            batch = self._batches.get(batch_id)
        if batch is None:
            return self._fail(f"unknown batch id {batch_id}")
        status = batch.poll()[0]
        if status.state is State.PENDING:
            return 0
        with self._lock:
            self._batches.pop(batch_id, None)
        if status.ok:
            return 1
        self._fail(f"batch {batch_id}: {status.state.name}: {status.reason}")
        return -2 if status.state is State.TIMEOUT else -1

    def get_notifies(self) -> list[TransferNotify]:
        """Notifications peers sent with their transfers since the last call, oldest first."""
        return [TransferNotify(name, msg) for name, msg in self._need().notifications()]

    # -- helpers -----------------------------------------------------------------------

    def _need(self) -> _Engine:
        if self._engine is None:
            raise RuntimeError("TransferEngine.initialize() has not been called")
        return self._engine

    def _fail(self, reason: str) -> int:
        self.last_error = reason
        log.warning("%s", reason)
        return -1

    def _keep(self, batch: Batch) -> int:
        with self._lock:
            bid = next(self._ids)
            self._batches[bid] = batch
        return bid

    def _submit(self, target: str, buffers: Sequence[int], peers: Sequence[int], lengths: Sequence[int],
                opcode: _Opcode) -> Batch | None:
        if not len(buffers) == len(peers) == len(lengths):
            self._fail("buffers, peer_buffer_addresses and lengths have different size")
            return None
        eng = self._need()
        op = Op(int(opcode))
        try:
            seg = eng.open_segment(target)
            return eng.submit([Request(op, int(a), seg, int(b), int(n)) for a, b, n in zip(buffers, peers, lengths)])
        except MoonletError as e:
            self._fail(f"{op.name} to {target}: {e}")
            return None

    def _outcome(self, statuses: list, what: str) -> int:
        bad = [s for s in statuses if not s.ok]
        if not bad:
            return 0
        self._fail(f"{what}: {len(bad)} of {len(statuses)} request(s) did not complete; first: "
                   f"{bad[0].state.name}: {bad[0].reason}")
        return -1

    def __del__(self) -> None:
        if self._engine is not None:
            try:
                self._engine.close()
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass


def _bind_address(host: str) -> str:
    """Where to listen for ``local_hostname``'s host: that address if it is one of ours, else all addresses."""
    if host in ("", "0.0.0.0", "::"):
        return "0.0.0.0"
    try:
        with socket.socket() as s:
            s.bind((host, 0))
        return host
    except OSError:
        return "0.0.0.0"


__all__ = ["TransferEngine", "TransferOpcode", "TransferNotify", "parse_metadata"]
