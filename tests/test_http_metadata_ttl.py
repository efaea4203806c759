"""The HTTP metadata server forgets the dead: leased descriptors expire unless renewed, a clean close deletes at
once, and ``persist`` keeps the store (with each entry's expiry) across a restart. Real servers, real engines."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers.memory import sha
from moonlet import ConfigError, MetadataServer, SegmentError, TransferEngine
from moonlet.metadata import HttpMetadata

DESCRIPTOR = b'{"version": 1, "name": "orphan"}'


def wait_gone(client: HttpMetadata, name: str, within: float) -> float:
    """Seconds until ``name`` has no descriptor; fails if it still has one after ``within`` seconds."""
    start = time.monotonic()
    while client.fetch(name) is not None:
        assert time.monotonic() - start < within, f"{name!r} still published after {within} s"
        time.sleep(0.05)
    return time.monotonic() - start


def test_killed_engine_disappears_within_the_ttl(metadata_server, peer_factory):
    victim = peer_factory("--metadata", metadata_server.url, "--name", "doomed", "--ttl", "1")
    client = HttpMetadata(metadata_server.url, 2.0)
    with TransferEngine("prefill", metadata_server.url) as eng:
        data = bytearray(os.urandom(8192))
        buf = eng.register(data)
        eng.write(buf.addr, eng.open_segment("doomed"), victim.addr, 8192)
        assert victim.digest(victim.addr, 8192) == sha(data)
        victim.kill()  # kill -9: no DELETE, the lease must run out
        assert wait_gone(client, "doomed", within=2.5) <= 2.5  # TTL 1 s after the last renewal, plus polling
    with TransferEngine("latecomer", metadata_server.url) as late:
        with pytest.raises(SegmentError, match="unknown segment 'doomed'.*descriptors expire when their engine "
                                               "stops renewing them"):
            late.open_segment("doomed")


def test_live_engine_is_renewed_while_an_unrenewed_entry_expires(metadata_server, peer_factory):
    target = peer_factory("--metadata", metadata_server.url, "--name", "steady", "--ttl", "1")
    client = HttpMetadata(metadata_server.url, 2.0, ttl=1.0)
    client.publish("orphan", DESCRIPTOR)  # the same TTL, and no keepalive: as an engine that died
    forever = os.urandom(512)
    client.put_key("mooncake/keep", forever)  # no TTL: a key of Mooncake's, kept as before
    store = metadata_server._server
    start = time.monotonic()
    while time.monotonic() - start < 3.5:  # several TTLs
        assert client.fetch("steady") is not None, f"live engine dropped after {time.monotonic() - start:.2f} s"
        time.sleep(0.1)
    # The orphan was never read again: the server's own sweep dropped it, its bytes released.
    assert "moonlet/segments/orphan" not in store.store
    assert client.fetch("orphan") is None
    assert client.get_key("mooncake/keep") == forever
    with store.lock:
        assert store.used == sum(len(k) + len(v) + 256 for k, v in store.store.items())
    with TransferEngine("prefill", metadata_server.url) as eng:
        data = bytearray(os.urandom(4096))
        buf = eng.register(data)
        eng.write(buf.addr, eng.open_segment("steady"), target.addr, 4096)
        assert target.digest(target.addr, 4096) == sha(data)


def test_clean_close_deletes_at_once_and_a_restart_does_not_bring_it_back(tmp_path, peer_factory):
    path = str(tmp_path / "store.json")
    srv = MetadataServer(port=0, persist=path).start()
    try:
        peer = peer_factory("--metadata", srv.url, "--name", "brief", "--ttl", "30")
        client = HttpMetadata(srv.url, 2.0)
        assert client.fetch("brief") is not None
        peer.close()
        assert client.fetch("brief") is None  # at once, not after the 30 s TTL
    finally:
        srv.stop()
    with MetadataServer(port=srv.port, persist=path) as again:
        assert HttpMetadata(again.url, 2.0).fetch("brief") is None


def test_persist_keeps_live_entries_and_drops_expired_ones(tmp_path, peer_factory):
    path = str(tmp_path / "store.json")
    srv = MetadataServer(port=0, persist=path).start()
    try:
        live = peer_factory("--metadata", srv.url, "--name", "live", "--ttl", "30")
        client = HttpMetadata(srv.url, 2.0, ttl=1.0)
        client.publish("orphan", DESCRIPTOR)
        forever = os.urandom(4096)
        client.put_key("mooncake/keep", forever)
        assert client.fetch("orphan") == DESCRIPTOR
    finally:
        srv.stop()
    time.sleep(1.2)  # the orphan's TTL runs out while the server is down
    with MetadataServer(port=srv.port, persist=path) as again:
        store = again._server
        assert client.fetch("orphan") is None
        assert "moonlet/segments/orphan" not in store.store  # dropped on load, not kept until read
        assert client.get_key("mooncake/keep") == forever
        assert "mooncake/keep" not in store.expiry  # still never expires
        left = store.expiry["moonlet/segments/live"] - time.monotonic()
        assert 25 < left <= 30  # the live entry kept its expiry: it is not immortal now
        with TransferEngine("prefill", again.url) as eng:
            data = bytearray(os.urandom(4096))
            buf = eng.register(data)
            seg = eng.open_segment("live")
            assert seg.descriptor.pid == live.pid
            eng.write(buf.addr, seg, live.addr, 4096)
            assert live.digest(live.addr, 4096) == sha(data)


def test_bad_ttls_and_persist_files_are_refused(metadata_server, tmp_path):
    for ttl in ("0", "-1", "nan", "soon", "1e7"):
        conn = http.client.HTTPConnection(metadata_server.host, metadata_server.port, timeout=5)
        conn.request("PUT", "/metadata?key=k", body=b"{}", headers={"X-Moonlet-TTL": ttl})
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (400, f"X-Moonlet-TTL: {ttl!r} refused: seconds, 0 < TTL <= 1e+06"
                                              .encode())
        conn.close()
    assert HttpMetadata(metadata_server.url, 2.0).get_key("k") is None
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 1, "entries": [["k", "not base64!", null]]}')
    with pytest.raises(ConfigError, match="persist file .*bad.json.* holds a bad entry"):
        MetadataServer(port=0, persist=str(bad))
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="is not a metadata server persist file"):
        MetadataServer(port=0, persist=str(bad))


def test_cli_writes_its_persist_file_on_sigterm(tmp_path):
    path = str(tmp_path / "cli.json")
    proc = subprocess.Popen([sys.executable, "-m", "moonlet.cli.main", "metadata-server", "--port", "0",
                             "--persist", path], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().split(" on ")[1].strip()
        value = os.urandom(1000)
        HttpMetadata(url, 2.0).put_key("mooncake/cli", value)
        proc.send_signal(signal.SIGTERM)  # ends it as Ctrl-C does: the store written, exit 0
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with open(path) as f:
        assert json.load(f)["version"] == 1
    with MetadataServer(port=0, persist=path) as srv:
        assert HttpMetadata(srv.url, 2.0).get_key("mooncake/cli") == value
