"""A peer that misbehaves on purpose cannot starve the target or its other peers."""

from __future__ import annotations

import os
import socket
import time

from helpers.engines import initiator
from helpers.memory import register_random, sha
from helpers.net import connect, unanswered
from helpers.procs import rss_kib
from moonlet import EngineConfig, TransferEngine
from moonlet.transport.tcp import protocol as P


def test_a_reader_that_never_reads_does_not_stall_other_peers(peer):
    """One connection asks for 4 GiB of replies and reads none; another peer's transfers carry on."""
    greedy = connect(peer.name)
    greedy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    rss_before = rss_kib(peer.pid)
    try:
        for i in range(64):  # 64 READs of 64 MiB each
            greedy.sendall(P.encode_request(P.READ, i + 1, [(peer.addr, peer.size)]))
        with initiator(request_timeout=10.0) as eng:
            buf, m = register_random(eng, 1 << 20)
            seg = eng.open_segment(peer.name)
            start = time.monotonic()
            for k in range(20):
                eng.write(buf.addr, seg, peer.addr + k * 65536, 65536)
                eng.read(buf.addr + 65536, seg, peer.addr + k * 65536, 65536)
                assert m[65536:131072] == m[:65536]
            assert time.monotonic() - start < 5.0
            assert peer.digest(peer.addr, 65536) == sha(m[:65536])
        # replies are queued as views of registered memory, never copies: the target did not balloon
        assert rss_kib(peer.pid) - rss_before < 64 * 1024
    finally:
        greedy.close()


def test_a_flood_of_connections_is_capped(peer_factory):
    import json

    target = peer_factory("--config", json.dumps({"max_connections": 8}))
    held = []
    try:
        for _ in range(40):
            try:
                held.append(connect(target.name, timeout=2))
            except OSError:
                break
        time.sleep(0.3)
        # those past the limit were answered ERROR and closed: recv gives bytes or EOF
        assert len(unanswered(held)) == 8
    finally:
        for s in held:
            s.close()
    time.sleep(0.3)
    # and once they are gone, the target serves a well-behaved peer
    with TransferEngine(config=EngineConfig(transports=("tcp",))) as eng:
        m = bytearray(os.urandom(4096))
        eng.write(eng.register(m).addr, eng.open_segment(target.name), target.addr, 4096)
        assert target.digest(target.addr, 4096) == sha(m)
