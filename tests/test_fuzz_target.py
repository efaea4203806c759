"""Malformed frames thrown at a live target: it stays up, serves the next good request, and no byte changes."""

from __future__ import annotations

import os
import socket
import struct
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.memory import sha
from helpers.net import raw_read
from moonlet import TransferEngine
from moonlet.transport.tcp import protocol as P

SIZE = 1 << 20


@pytest.fixture(scope="module")
def target():
    """An engine with 1 MiB of random registered memory, closed when the module's tests are done."""
    with TransferEngine() as eng:
        mem = bytearray(os.urandom(SIZE))
        buf = eng.register(mem)
        host, port = eng.name.rsplit(":", 1)
        yield SimpleNamespace(engine=eng, mem=mem, buf=buf, host=host, port=int(port),
                              before=sha(mem))


# Frames that look almost right: valid prefix shapes with hostile fields, plus raw noise.
prefixes = st.builds(
    lambda magic, ver, kind, count, rid, plen: struct.pack("<HBBIQQ", magic, ver, kind, count, rid, plen),
    st.sampled_from([P.MAGIC, 0, 0xFFFF]), st.sampled_from([P.VERSION, 0, 2]), st.integers(0, 9),
    st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))
entries = st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)), max_size=8).map(
    lambda es: b"".join(struct.pack("<QQ", a, n) for a, n in es))
near = st.integers(-4096, SIZE + 4096)  # offsets from the registered buffer's start


def _bad_write(base, es, extra, body):
    """A WRITE aimed at registered memory (``es``: offsets from ``base``) whose announced payload does not
    match its entries."""
    table = b"".join(struct.pack("<QQ", base + a, n) for a, n in es)
    plen = max(0, sum(n for _, n in es) + extra)  # extra != 0, and the sum is >= 1: never equal
    if plen == sum(n for _, n in es):
        plen += 1
    return struct.pack("<HBBIQQ", P.MAGIC, P.VERSION, P.WRITE, len(es), 1, plen) + table + body


bad_writes = st.tuples(st.lists(st.tuples(near, st.integers(1, 4096)), min_size=1, max_size=4),
                       st.integers(1, 1 << 20) | st.integers(-(1 << 20), -1), st.binary(max_size=512))
frames = (st.tuples(prefixes, entries, st.binary(max_size=256)).map(lambda t: b"".join(t))
          | st.binary(max_size=512) | bad_writes)


def good_request_works(target) -> bool:
    with socket.create_connection((target.host, target.port), timeout=5) as s:
        try:
            got = raw_read(s, target.buf.addr + 100, 32, req_id=1)
        except ConnectionError:
            return False
        return got[P.PREFIX_SIZE + 1:] == bytes(target.mem[100:132])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(frames, min_size=1, max_size=3))
def test_malformed_frames_change_nothing(target, payloads):
    with socket.create_connection((target.host, target.port), timeout=5) as s:
        for data in payloads:
            if isinstance(data, tuple):  # a bad WRITE, aimed at the buffer's address
                data = _bad_write(target.buf.addr, *data)
            try:
                s.sendall(data)
            except OSError:
                break
        s.settimeout(2)
        try:  # the target may already have closed on us (RST): that is a fine answer
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass
        except OSError:
            pass
    assert sha(target.mem) == target.before
    assert good_request_works(target)


def test_target_stays_up_after_fuzzing(target):
    assert good_request_works(target)
    assert sha(target.mem) == target.before
    assert target.engine.descriptor().buffers[0]["addr"] == target.buf.addr
