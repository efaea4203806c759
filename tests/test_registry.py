"""The transport contract: a transport is its own module plus one registry entry, and the engine routes to it,
publishes what it publishes, counts what it counts and skips it where it cannot run, knowing nothing else."""

from __future__ import annotations

import ctypes
import logging
import os

import pytest

from helpers.memory import sha
from helpers.net import connect, raw_read, recv_exact
from moonlet import EngineConfig, TransferEngine
from moonlet.batch import Batch
from moonlet.errors import ConfigError
from moonlet.memory import Buffer, Denied
from moonlet.segment import RemoteBuffer, Segment, SegmentDescriptor
from moonlet.transport import registry
from moonlet.transport.base import HostContext, Transport, WorkItem
from moonlet.transport.mooncake_wire import transport as mooncake_wire_transport
from moonlet.transport.spec import TransportSpec
from moonlet.transport.tcp import protocol as P


class Loopback(Transport):
    """A toy transport: peers of this process that publish a ``loopback`` endpoint, by memmove."""

    name = "loopback"

    def __init__(self, ctx: HostContext) -> None:
        self.pid = os.getpid()
        self.moved = 0

    def endpoint(self) -> str:
        return f"pid:{self.pid}"

    def reaches(self, local: Buffer, peer: SegmentDescriptor, remote: RemoteBuffer) -> bool:
        return peer.endpoints.get(self.name) == self.endpoint() and local.is_host

    def submit(self, segment: Segment, batch: Batch, items: list[WorkItem]) -> None:
        batch.add_parts([(index, 1) for index, *_ in items], self.name)
        for index, req, _, _ in items:
            src, dst = (req.local_addr, req.remote_addr) if req.op else (req.remote_addr, req.local_addr)
            ctypes.memmove(dst, src, req.length)
            self.moved += req.length
            batch.part_done(index)

    def stats(self) -> dict[str, int]:
        return {"loopback_bytes": self.moved}


@pytest.fixture
def loopback(monkeypatch):
    """The registry with the toy transport's one line added (first: preferred over every other)."""
    monkeypatch.setattr(registry, "TRANSPORTS", (TransportSpec("loopback", Loopback), *registry.TRANSPORTS))


def test_a_transport_added_by_one_registry_line_carries_requests(loopback):
    cfg = EngineConfig(transports=("loopback", "tcp"), request_timeout=5.0)
    with TransferEngine(config=cfg) as target, TransferEngine(config=cfg) as initiator:
        remote = bytearray(os.urandom(1 << 20))
        rbuf = target.register(remote)
        local = bytearray(os.urandom(1 << 20))
        lbuf = initiator.register(local)
        assert target.descriptor().endpoints["loopback"] == f"pid:{os.getpid()}"  # published through the contract
        status = initiator.write(lbuf.addr, target.name, rbuf.addr + 4096, 65536)
        assert status.transport == "loopback"
        assert sha(remote[4096:4096 + 65536]) == sha(local[:65536])
        fresh = bytearray(os.urandom(1 << 20))
        fbuf = initiator.register(fresh)
        initiator.read(fbuf.addr, target.name, rbuf.addr, 1 << 20)
        assert sha(fresh) == sha(remote)
        assert initiator.stats()["loopback_bytes"] == 65536 + (1 << 20)
        assert "tcp_connects" in initiator.stats()  # every transport's counters, merged


def test_a_peer_without_the_transport_is_reached_by_the_next_one(loopback):
    with TransferEngine(config=EngineConfig(transports=("tcp",))) as target, \
            TransferEngine(config=EngineConfig(transports=("loopback", "tcp"))) as initiator:
        remote = bytearray(os.urandom(65536))
        rbuf = target.register(remote)
        local = bytearray(os.urandom(65536))
        lbuf = initiator.register(local)
        assert initiator.write(lbuf.addr, target.name, rbuf.addr, 65536).transport == "tcp"
        assert sha(remote) == sha(local)


def test_a_transport_this_host_cannot_run_is_skipped_with_its_reason(monkeypatch, caplog):
    spec = TransportSpec("loopback", Loopback, missing=lambda cfg: "no loopback device here")
    monkeypatch.setattr(registry, "TRANSPORTS", (spec, *registry.TRANSPORTS))
    with caplog.at_level(logging.WARNING, logger="moonlet"):
        with TransferEngine(config=EngineConfig(transports=("loopback", "tcp"))) as eng:
            assert "loopback" not in eng.descriptor().endpoints
    assert "loopback: no loopback device here" in caplog.text
    with pytest.raises(ConfigError, match="loopback: no loopback device here"):
        TransferEngine(config=EngineConfig(transports=("loopback",)))


def test_a_required_transport_that_fails_to_start_stops_the_engine(monkeypatch):
    def broken(ctx: HostContext) -> Transport:
        raise OSError("the loopback device is busy")
    spec = TransportSpec("loopback", broken, policy=lambda cfg: "required")
    monkeypatch.setattr(registry, "TRANSPORTS", (spec, *registry.TRANSPORTS))
    with pytest.raises(ConfigError, match="LOOPBACK transport cannot start: the loopback device is busy"):
        TransferEngine(config=EngineConfig(transports=("loopback", "tcp")))
    optional = TransportSpec("loopback", broken)
    monkeypatch.setattr(registry, "TRANSPORTS", (optional, *registry.TRANSPORTS[1:]))
    with TransferEngine(config=EngineConfig(transports=("loopback", "tcp"))) as eng:  # auto: goes on without it
        assert "loopback" not in eng.descriptor().endpoints


def test_the_default_order_is_the_registry_order():
    assert registry.default_order() == ("local", "cuda_ipc", "shm", "rdma", "tcp")
    assert set(registry.available()) <= set(registry.default_order())
    assert "tcp" in registry.available() and "local" in registry.available()


def test_same_host_frames_to_an_engine_without_that_transport_are_refused_not_dropped():
    """PULL/PUSH reach an engine that runs no same-host transport (a stale descriptor, or the moment before it
    starts): each entry is answered ATTACH_REFUSED, so the initiator carries it over TCP, and the connection
    goes on serving."""
    with TransferEngine(config=EngineConfig(transports=("tcp",))) as target:
        mem = bytearray(os.urandom(4096))
        buf = target.register(mem)
        with connect(target.name) as s:
            s.sendall(P.encode_request_flat(P.PULL, 3, [buf.addr, 64, 0x400000, buf.addr + 64, 64, 0x500000]))
            reply = P.FrameReader(initiator=True).feed(recv_exact(s, P.PREFIX_SIZE + 2))
            assert [(f.kind, f.req_id, f.statuses) for f in reply] == [(P.RESP, 3, bytes([Denied.ATTACH_REFUSED]) * 2)]
            assert raw_read(s, buf.addr, 4096)[P.PREFIX_SIZE:] == b"\x00" + bytes(mem)  # the connection serves on


def test_a_wire_asked_for_explicitly_that_cannot_start_stops_the_engine(monkeypatch):
    """mooncake_wire=True is a promise to Mooncake peers: its server failing to bind is an error, not a warning."""
    def busy(*args: object, **kwargs: object) -> None:
        raise OSError(98, "Address already in use")
    monkeypatch.setattr(mooncake_wire_transport, "MooncakeServer", busy)
    with pytest.raises(ConfigError, match="MOONCAKE_TCP transport cannot start: .*Address already in use"):
        TransferEngine(config=EngineConfig(mooncake_wire=True))
