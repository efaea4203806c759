"""The array form of submit: the same bytes as per-request submits, over every transport."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

from helpers.memory import sha
from moonlet import ConfigError, Op, State, TransferEngine


@pytest.mark.parametrize("n,longest,stride,frame_bytes", [
    (200, 9000, 10000, None),
    (600, 6000, 6000, None),  # more requests than a frame carries (frame_entries 256)
    (300, 12000, 12000, 256 << 10),  # tcp: more bytes than a frame carries (about seven frames)
])
@pytest.mark.parametrize("transport,target_memory", [("tcp", "register"), ("shm", "register"), ("shm", "allocate")])
def test_arrays_move_the_same_bytes(peer, transport, target_memory, n, longest, stride, frame_bytes):
    limits = {} if frame_bytes is None else {"frame_bytes": frame_bytes}
    with TransferEngine(transports=(transport,), **limits) as eng:
        mem = bytearray(os.urandom(8 << 20))
        buf = eng.register(mem)
        remote = peer.addr if target_memory == "register" else peer.call(f"allocate {8 << 20}")["addr"]
        seg = eng.open_segment(peer.name)
        rng = random.Random(3)
        lengths = [rng.randrange(1, longest) for _ in range(n)]
        las = [buf.addr + i * stride for i in range(n)]
        ras = [remote + i * 2 * stride + rng.randrange(0, 64) for i in range(n)]
        batch = eng.submit_many(Op.WRITE, seg, np.array(las), np.array(ras), np.array(lengths))
        statuses = batch.wait()
        assert len(batch) == n and all(s.ok and s.transport == transport for s in statuses)
        for a, b, k in list(zip(las, ras, lengths))[::11]:
            assert peer.digest(b, k) == sha(mem[a - buf.addr:a - buf.addr + k])
        back = [a + (4 << 20) for a in las]
        eng.submit_many(Op.READ, seg, back, ras, lengths).check()
        for a, b, k in zip(las, back, lengths):
            assert mem[b - buf.addr:b - buf.addr + k] == mem[a - buf.addr:a - buf.addr + k]


def test_ranges_across_buffers_take_the_general_path(engine, peer):
    one, two = bytearray(os.urandom(4096)), bytearray(os.urandom(4096))
    b1, b2 = engine.register(one), engine.register(two)
    seg = engine.open_segment(peer.name)
    statuses = engine.submit_many(Op.WRITE, seg, [b1.addr, b2.addr], [peer.addr, peer.addr + 4096],
                                  [4096, 4096]).wait()
    assert all(s.ok for s in statuses)
    assert peer.digest(peer.addr, 4096) == sha(one) and peer.digest(peer.addr + 4096, 4096) == sha(two)
    # A range outside the peer's buffers fails that request only, with the usual reason.
    statuses = engine.submit_many(Op.WRITE, seg, [b1.addr, b1.addr], [peer.addr, peer.addr + peer.size],
                                  [16, 16]).wait()
    assert statuses[0].ok and statuses[1].state is State.FAILED and "not inside" in statuses[1].reason


def test_bad_arrays(engine, peer):
    buf = engine.register(bytearray(64))
    with pytest.raises(ConfigError, match="differ in length"):
        engine.submit_many(Op.READ, peer.name, [buf.addr], [peer.addr, peer.addr], [8])
    with pytest.raises(Exception, match="length must be positive"):
        engine.submit_many(Op.READ, peer.name, [buf.addr], [peer.addr], [0])
    assert len(engine.submit_many(Op.READ, peer.name, [], [], []).wait()) == 0


@pytest.mark.parametrize("transport,target_memory", [("tcp", "register"), ("shm", "register"), ("shm", "allocate")])
def test_adjacent_requests_move_as_one_range(peer, transport, target_memory):
    """A batch whose requests follow one another on both sides travels as one range; every request
    still gets its status, and the bytes are the same as request by request."""
    with TransferEngine(transports=(transport,)) as eng:
        mem = bytearray(os.urandom(1 << 20))
        buf = eng.register(mem)
        remote = peer.addr if target_memory == "register" else peer.call(f"allocate {1 << 20}")["addr"]
        seg = eng.open_segment(peer.name)
        lengths = [4096, 100, 7, 65536, 3000] * 6
        las = [buf.addr + 11 + sum(lengths[:i]) for i in range(len(lengths))]
        ras = [remote + 5 + sum(lengths[:i]) for i in range(len(lengths))]
        total = sum(lengths)
        statuses = eng.submit_many(Op.WRITE, seg, las, ras, lengths).wait()
        assert len(statuses) == len(lengths) and all(s.ok and s.transport == transport for s in statuses)
        assert peer.digest(remote + 5, total) == sha(mem[11:11 + total])
        back = [a + (512 << 10) for a in las]
        statuses = eng.submit_many(Op.READ, seg, back, ras, lengths).wait()
        assert len(statuses) == len(lengths) and all(s.ok for s in statuses)
        assert mem[11 + (512 << 10):11 + (512 << 10) + total] == mem[11:11 + total]


def test_adjacent_requests_refused_together_each_with_its_reason(peer_factory):
    ro = peer_factory("--read-only")
    with TransferEngine(transports=("tcp",)) as eng:
        buf = eng.register(bytearray(os.urandom(65536)))
        seg = eng.open_segment(ro.name)
        before = ro.digest(ro.addr, 65536)
        statuses = eng.submit_many(Op.WRITE, seg, [buf.addr + i * 4096 for i in range(16)],
                                   [ro.addr + i * 4096 for i in range(16)], [4096] * 16).wait()
        assert len(statuses) == 16
        assert all(s.state is State.FAILED and "does not allow" in s.reason for s in statuses)
        assert ro.digest(ro.addr, 65536) == before

