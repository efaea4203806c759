"""Metadata: the HTTP server's REST shape, p2p resolution, publication and withdrawal."""

from __future__ import annotations

import json
import os

import pytest

from helpers.net import metadata_http
from moonlet import MetadataError, SegmentError, TransferEngine
from moonlet.metadata import HttpMetadata


def test_rest_shape(metadata_server):
    assert metadata_http(metadata_server, "GET", "k")[0] == 404
    assert metadata_http(metadata_server, "PUT", "k", b'{"a": 1}') == (200, b"metadata updated")
    assert metadata_http(metadata_server, "GET", "k") == (200, b'{"a": 1}')
    assert metadata_http(metadata_server, "DELETE", "k")[0] == 200
    assert metadata_http(metadata_server, "GET", "k")[0] == 404
    assert metadata_http(metadata_server, "GET", None)[0] == 400


def test_engines_find_each_other_by_name(metadata_server, peer_factory):
    target = peer_factory("--metadata", metadata_server.url, "--name", "decode-0")
    with TransferEngine("prefill-0", metadata_server.url) as eng:
        assert eng.name == "prefill-0"
        seg = eng.open_segment("decode-0")
        assert seg.buffers[0].addr == target.addr
        data = bytearray(os.urandom(4096))
        buf = eng.register(data)
        eng.write(buf.addr, "decode-0", target.addr + 5, 4096)  # a name works as well as a Segment
        copy = bytearray(4096)
        eng.read(eng.register(copy).addr, seg, target.addr + 5, 4096)
        assert copy == data
        # Our own descriptor is published, with both buffers.
        status, body = metadata_http(metadata_server, "GET", "moonlet/segments/prefill-0")
        assert status == 200 and len(json.loads(body)["buffers"]) == 2
    # close() withdraws it at once.
    assert metadata_http(metadata_server, "GET", "moonlet/segments/prefill-0")[0] == 404


def test_http_base_url_forms(metadata_server):
    for url in (f"http://{metadata_server.host}:{metadata_server.port}", metadata_server.url):
        client = HttpMetadata(url, 2.0)
        client.publish("x", b"{}")
        assert client.fetch("x") == b"{}"
        client.remove("x")
    with pytest.raises(MetadataError, match="not of the form"):
        HttpMetadata("ftp://h", 1.0)


def test_malformed_descriptor_is_refused(metadata_server):
    HttpMetadata(metadata_server.url, 2.0).publish("junk", b'{"version": 1, "name": "junk"}')
    with TransferEngine("me", metadata_server.url) as eng:
        with pytest.raises(SegmentError, match="malformed segment descriptor"):
            eng.open_segment("junk")


def test_p2p_name_is_host_port(engine, peer):
    host, port = peer.name.rsplit(":", 1)
    assert host == "127.0.0.1" and port.isdigit()
    assert engine.open_segment(peer.name).descriptor.pid == peer.pid
