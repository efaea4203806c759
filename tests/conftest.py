"""Shared fixtures: initiator engines in this process, target engines in subprocesses, random registered
memory. What they are built from lives in the ``helpers`` package."""

from __future__ import annotations

import pytest

from helpers.engines import initiator
from helpers.memory import register_random
from helpers.procs import PeerProcess
from moonlet import EngineConfig, MetadataServer, TransferEngine


@pytest.fixture
def peer_factory():
    peers: list[PeerProcess] = []

    def make(*args: str, prefix: tuple[str, ...] = ()) -> PeerProcess:
        p = PeerProcess(*args, prefix=prefix)
        peers.append(p)
        return p

    yield make
    for p in peers:
        p.close()


@pytest.fixture
def peer(peer_factory) -> PeerProcess:
    return peer_factory()


@pytest.fixture(params=["tcp", "shm"])
def engine(request):
    """An initiator restricted to one transport, so each test runs over each path."""
    with initiator(transports=(request.param,), request_timeout=10.0) as eng:
        yield eng


@pytest.fixture
def tcp_engine():
    """An initiator that speaks TCP only (for tests of TCP-specific failures)."""
    with initiator(request_timeout=10.0) as eng:
        yield eng


@pytest.fixture
def wire_engine():
    """An engine that also speaks Mooncake's wire (``EngineConfig.mooncake_wire``), over any transport."""
    with TransferEngine(config=EngineConfig(request_timeout=10.0, mooncake_wire=True)) as eng:
        yield eng


@pytest.fixture
def local(engine):
    """64 MiB of registered local memory filled with random bytes: (buffer, memoryview)."""
    return register_random(engine, 64 << 20)


@pytest.fixture
def metadata_server():
    with MetadataServer(port=0) as srv:
        yield srv
