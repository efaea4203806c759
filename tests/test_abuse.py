"""A peer that misbehaves on purpose cannot starve the target or its other peers."""

from __future__ import annotations

import hashlib
import mmap
import os
import socket
import time

from moonlet import EngineConfig, TransferEngine
from moonlet.transport.tcp import protocol as P


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_a_reader_that_never_reads_does_not_stall_other_peers(peer):
    """One connection asks for 4 GiB of replies and reads none; another peer's transfers carry on."""
    host, port = peer.name.rsplit(":", 1)
    greedy = socket.create_connection((host, int(port)), timeout=5)
    greedy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    rss_before = rss_kib(peer.pid)
    try:
        for i in range(64):  # 64 READs of 64 MiB each
            greedy.sendall(P.encode_request(P.READ, i + 1, [(peer.addr, peer.size)]))
        with TransferEngine(config=EngineConfig(transports=("tcp",), request_timeout=10.0)) as eng:
            m = mmap.mmap(-1, 1 << 20)
            m[:] = os.urandom(1 << 20)
            buf = eng.register(m)
            seg = eng.open_segment(peer.name)
            start = time.monotonic()
            for k in range(20):
                eng.write(buf.addr, seg, peer.addr + k * 65536, 65536)
                eng.read(buf.addr + 65536, seg, peer.addr + k * 65536, 65536)
                assert m[65536:131072] == m[:65536]
            assert time.monotonic() - start < 5.0
            assert peer.digest(peer.addr, 65536) == hashlib.sha256(m[:65536]).hexdigest()
        # replies are queued as views of registered memory, never copies: the target did not balloon
        assert rss_kib(peer.pid) - rss_before < 64 * 1024
    finally:
        greedy.close()


def test_a_flood_of_connections_is_capped(peer_factory):
    import json

    target = peer_factory("--config", json.dumps({"max_connections": 8}))
    host, port = target.name.rsplit(":", 1)
    held = []
    try:
        for _ in range(40):
            try:
                held.append(socket.create_connection((host, int(port)), timeout=2))
            except OSError:
                break
        time.sleep(0.3)
        alive = 0
        for s in held:  # those past the limit were answered ERROR and closed: recv gives bytes or EOF
            s.setblocking(False)
            try:
                s.recv(1 << 16)
            except BlockingIOError:
                alive += 1
        assert alive == 8
    finally:
        for s in held:
            s.close()
    time.sleep(0.3)
    # and once they are gone, the target serves a well-behaved peer
    with TransferEngine(config=EngineConfig(transports=("tcp",))) as eng:
        m = bytearray(os.urandom(4096))
        eng.write(eng.register(m).addr, eng.open_segment(target.name), target.addr, 4096)
        assert target.digest(target.addr, 4096) == hashlib.sha256(m).hexdigest()
