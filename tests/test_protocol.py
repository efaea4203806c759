"""The sans-IO wire format: round trips, every split point, and fuzzing without sockets."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moonlet import ProtocolError
from moonlet.transport.tcp import protocol as P


def parse_all(data: bytes, step: int, initiator: bool = False, fast: bool = True) -> list:
    """Feed ``data`` in pieces of ``step`` bytes to the reader a target (or an initiator) serves with."""
    reader = P.FrameReader(initiator)
    reader.fast = fast
    out = []
    for i in range(0, len(data), step):
        out.extend(reader.feed(data[i:i + step]))
    return out


def target_stream() -> tuple[bytes, list]:
    entries = [(0x1000, 3), (0x2000, 5)]
    payload = b"abc" + b"defgh"
    data = (P.encode_hello("peer") + P.encode_request(P.WRITE, 7, entries) + payload
            + P.encode_request(P.READ, 8, [(0x3000, 10)]) + P.encode_request(P.WRITE, 9, [(0x4000, 2)]) + b"yz"
            + P.encode_request_flat(P.PULL, 10, [0x5000, 4, 0x6000]) + P.encode_get_desc())
    return data, entries


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("step", [1, 2, 3, 5, 24, 1000])
def test_requests_parse_identically_at_every_split(step, fast):
    data, entries = target_stream()
    events = parse_all(data, step, fast=fast)
    frames = [e for e in events if isinstance(e, P.Frame)]
    payload = b"".join(e.data for e in events if isinstance(e, P.Payload))
    assert [f.kind for f in frames] == [P.HELLO, P.WRITE, P.READ, P.WRITE, P.PULL, P.GET_DESC]
    assert P.decode_hello(frames[0].body) == {"name": "peer"}
    assert frames[1].entries == entries and frames[1].req_id == 7 and frames[1].payload_len == 8
    assert frames[2].entries == [(0x3000, 10)] and frames[2].payload_len == 0  # the one-entry fast lane ...
    assert frames[3].entries == [(0x4000, 2)] and frames[3].payload_len == 2 and frames[3].req_id == 9  # ... agrees
    assert frames[4].entries == [(0x5000, 4, 0x6000)]
    assert payload == b"abcdefgh" + b"yz"


@pytest.mark.parametrize("step", [1, 2, 3, 5, 24, 1000])
def test_replies_parse_identically_at_every_split(step):
    data = (P.encode_response(7, b"\x00\x02", 0) + P.encode_response(8, b"\x00", 4) + b"wxyz"
            + P.encode_response(9, b"\x03", 0) + P.encode_error("no such thing"))
    events = parse_all(data, step, initiator=True)
    frames = [e for e in events if isinstance(e, P.Frame)]
    assert [(f.kind, f.req_id, f.statuses, f.payload_len) for f in frames[:3]] == [
        (P.RESP, 7, b"\x00\x02", 0), (P.RESP, 8, b"\x00", 4), (P.RESP, 9, b"\x03", 0)]
    assert frames[3].kind == P.ERROR and frames[3].body == b"no such thing"
    assert b"".join(e.data for e in events if isinstance(e, P.Payload)) == b"wxyz"


def test_each_side_refuses_the_other_sides_frames():
    with pytest.raises(ProtocolError, match="a target does not accept RESP frames"):
        P.FrameReader(initiator=False).feed(P.encode_response(1, b"\x00", 16) + bytes(16))
    with pytest.raises(ProtocolError, match="expected RESP from peer, got HELLO"):
        P.FrameReader(initiator=True).feed(P.encode_hello("x"))


@pytest.mark.parametrize("bad, message", [
    (struct.pack("<HBBIQQ", 0xBEEF, 1, P.WRITE, 1, 0, 1), "bad magic"),
    (struct.pack("<HBBIQQ", P.MAGIC, 9, P.WRITE, 1, 0, 1), "unsupported protocol version"),
    (struct.pack("<HBBIQQ", P.MAGIC, 1, 99, 0, 0, 0), "unknown frame kind"),
    (struct.pack("<HBBIQQ", P.MAGIC, 1, P.WRITE, 0, 0, 0), "entries; allowed"),
    (struct.pack("<HBBIQQ", P.MAGIC, 1, P.WRITE, P.MAX_ENTRIES + 1, 0, 0), "entries; allowed"),
    (struct.pack("<HBBIQQ", P.MAGIC, 1, P.HELLO, 0, 0, P.MAX_CONTROL_BODY + 1), "payload bytes; at most"),
    (struct.pack("<HBBIQQ", P.MAGIC, 1, P.READ, 1, 0, 5), "payload bytes; at most 0"),
    (struct.pack("<HBBIQQ", P.MAGIC, 1, P.GET_DESC, 3, 0, 0), "must have count 0"),
    (struct.pack("<HBBIQQ", P.MAGIC, 1, P.GET_DESC, 0, 0, 0), "at least 16"),
    (struct.pack("<HBBIQQ", P.MAGIC, 1, P.ERROR, 0, 0, 0), "at least 1"),
    (struct.pack("<HBBIQQ", P.MAGIC, 1, P.WRITE, 1, 0, 10) + struct.pack("<QQ", 0, 9), "add up to 9 bytes"),
    (struct.pack("<HBBIQQ", P.MAGIC, 1, P.READ, 1, 0, 0) + struct.pack("<QQ", 5, 0), "length 0"),
    (struct.pack("<HBBIQQ", P.MAGIC, 1, P.RESP, 1, 0, 0) + b"\x09", "unknown status code"),
])
def test_malformed_frames_raise_protocol_error(bad, message):
    reader = P.FrameReader(initiator=bad[3] == P.RESP)  # a reply is an initiator's to read, the rest a target's
    with pytest.raises(ProtocolError, match=message):
        reader.feed(bad + bytes(len(reader.head)))  # at least a whole head
    assert reader.state == P.BROKEN
    with pytest.raises(ProtocolError, match="already failed"):
        reader.feed(b"more")


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600), st.integers(1, 64))
def test_fuzz_parser_only_raises_protocol_error(data, step):
    for initiator in (False, True):
        try:
            parse_all(data, step, initiator)
        except ProtocolError:
            pass


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(1, 2**40)), min_size=1, max_size=50),
       st.integers(0, 2**64 - 1))
def test_request_round_trip(entries, req_id):
    for kind in (P.READ, P.WRITE):
        data = P.encode_request(kind, req_id, entries)
        p = P.parse_prefix(data[:P.PREFIX_SIZE])
        assert (p.kind, p.count, p.req_id) == (kind, len(entries), req_id)
        assert P.parse_entries(p, data[P.PREFIX_SIZE:]) == entries
        assert p.payload_len == (sum(n for _, n in entries) if kind == P.WRITE else 0)


def _single_by_general_parsers(head: bytes):
    """What parse_prefix + parse_entries make of a 40-byte head, as parse_single would report it."""
    try:
        p = P.parse_prefix(head)
        if p.kind not in (P.WRITE, P.READ) or p.count != 1:
            return None
        ((addr, length),) = P.parse_entries(p, head[P.PREFIX_SIZE:])
    except ProtocolError:
        return None
    return p.kind, p.req_id, addr, length


_U64 = st.integers(0, 2**64 - 1)


@settings(max_examples=600, deadline=None)
@given(st.sampled_from([P.MAGIC, 0x4C4D, 0]), st.sampled_from([P.VERSION, 0, 2]),
       st.sampled_from(sorted(P.KINDS) + [0, 99]), st.sampled_from([1, 0, 2, 4096]), _U64,
       st.one_of(st.just(None), st.just(0), st.just(P.MAX_PAYLOAD + 1), _U64), _U64,
       st.one_of(st.just(0), st.integers(1, 2**20), st.just(P.MAX_PAYLOAD), st.just(P.MAX_PAYLOAD + 1), _U64))
def test_single_entry_fast_parse_agrees_with_the_general_parsers(magic, version, kind, count, req_id, payload,
                                                                   addr, length):
    payload_len = length if payload is None else payload  # None: the consistent WRITE value
    head = struct.pack("<HBBIQQQQ", magic, version, kind, count, req_id, payload_len, addr, length)
    assert P.parse_single(head) == _single_by_general_parsers(head)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=40, max_size=40))
def test_single_entry_fast_parse_agrees_on_random_bytes(head):
    assert P.parse_single(head) == _single_by_general_parsers(head)


def _single_reply_by_general_parsers(head: bytes):
    """What parse_prefix + parse_statuses make of a 25-byte RESP head, as parse_single_reply would report it."""
    try:
        p = P.parse_prefix(head)
        if p.kind != P.RESP or p.count != 1:
            return None
        (status,) = P.parse_statuses(p, head[P.PREFIX_SIZE:])
    except ProtocolError:
        return None
    return p.req_id, status, p.payload_len


@settings(max_examples=600, deadline=None)
@given(st.sampled_from([P.MAGIC, 0x4C4D, 0]), st.sampled_from([P.VERSION, 0, 2]),
       st.sampled_from(sorted(P.KINDS) + [0, 99]), st.sampled_from([1, 0, 2, 4096]), _U64,
       st.one_of(st.just(0), st.integers(1, 2**20), st.just(P.MAX_PAYLOAD), st.just(P.MAX_PAYLOAD + 1), _U64),
       st.one_of(st.sampled_from([0, P.MAX_STATUS, P.MAX_STATUS + 1, 255]), st.integers(0, 255)))
def test_one_status_fast_parse_agrees_with_the_general_parsers(magic, version, kind, count, req_id, payload_len,
                                                               status):
    head = struct.pack("<HBBIQQB", magic, version, kind, count, req_id, payload_len, status)
    assert P.parse_single_reply(head) == _single_reply_by_general_parsers(head)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=25, max_size=25))
def test_one_status_fast_parse_agrees_on_random_bytes(head):
    assert P.parse_single_reply(head) == _single_reply_by_general_parsers(head)


def test_one_status_fast_parse_takes_encoded_replies():
    assert P.parse_single_reply(P.encode_response(7, bytes(1), 0)) == (7, 0, 0)
    assert P.parse_single_reply(P.encode_response(8, bytes([P.MAX_STATUS]), 4096)) == (8, P.MAX_STATUS, 4096)
    assert P.parse_single_reply(P.encode_response(9, bytes(2), 0)) is None


def test_single_entry_fast_parse_takes_encoded_one_entry_requests():
    assert P.parse_single(P.encode_request(P.WRITE, 7, [(0x1000, 5)])) == (P.WRITE, 7, 0x1000, 5)
    assert P.parse_single(P.encode_request(P.READ, 8, [(0x2000, 9)])) == (P.READ, 8, 0x2000, 9)
    assert P.parse_single(P.encode_request(P.WRITE, 9, [(0x1000, 5), (0x3000, 1)])[:40]) is None
