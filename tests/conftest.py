"""Shared fixtures: engines in this process and target engines in subprocesses."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moonlet import EngineConfig, MetadataServer, TransferEngine

PEER = str(Path(__file__).with_name("peer.py"))


class PeerProcess:
    """A target engine in a subprocess (see peer.py)."""

    def __init__(self, *args: str, prefix: tuple[str, ...] = ()) -> None:
        """``prefix``: argv that runs the peer elsewhere (e.g. ``ip netns exec NS``)."""
        self.proc = subprocess.Popen([*prefix, sys.executable, PEER, *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"peer did not start (exit {self.proc.wait()})")
        info = json.loads(line)
        self.name, self.addr, self.size, self.pid = info["name"], info["addr"], info["size"], info["pid"]

    def call(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def digest(self, addr: int, length: int) -> str:
        return self.call(f"digest {addr} {length}")["sha256"]

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("exit\n")
                self.proc.stdin.flush()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


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
    with TransferEngine(config=EngineConfig(request_timeout=10.0, transports=(request.param,))) as eng:
        yield eng


@pytest.fixture
def tcp_engine():
    """An initiator that speaks TCP only (for tests of TCP-specific failures)."""
    with TransferEngine(config=EngineConfig(request_timeout=10.0, transports=("tcp",))) as eng:
        yield eng


@pytest.fixture
def local(engine):
    """64 MiB of registered local memory filled with random bytes: (buffer, memoryview)."""
    mem = mmap.mmap(-1, 64 << 20)
    mem[:] = os.urandom(64 << 20)
    buf = engine.register(mem)
    return buf, memoryview(mem)


@pytest.fixture
def metadata_server():
    with MetadataServer(port=0) as srv:
        yield srv
