"""The same metadata suite over the embedded HTTP server, etcd and Redis — real servers, no mocks."""

from __future__ import annotations

import os
import time

import pytest

from helpers.memory import sha
from helpers.stores import Store
from moonlet import MetadataError, MetadataServer, Op, Request, SegmentError, TransferEngine


@pytest.fixture(params=["p2p", "http", "etcd", "redis"])
def store(request, tmp_path):
    """(kind, url, server); the server object can be stopped and started again for etcd and Redis."""
    if request.param == "p2p":
        yield "p2p", "p2p", None
        return
    if request.param == "http":
        with MetadataServer(port=0) as srv:
            yield "http", srv.url, None
        return
    srv = Store(request.param, str(tmp_path)).start()
    try:
        yield request.param, srv.url, srv
    finally:
        srv.stop()


def test_publish_resolve_and_move_bytes(store, peer_factory):
    kind, url, _ = store
    target = peer_factory("--metadata", url, "--name", "decode-7")
    with TransferEngine("prefill-7", url) as eng:
        data = bytearray(os.urandom(1 << 20))
        buf = eng.register(data)
        seg = eng.open_segment(target.name)  # "decode-7", or host:port in p2p mode
        assert (target.name == "decode-7") == (kind != "p2p")
        assert seg.descriptor.pid == target.pid
        eng.write(buf.addr, seg, target.addr + 9, 1 << 20)
        assert target.digest(target.addr + 9, 1 << 20) == sha(data)
        # A peer that registers more is picked up: the cache misses, the descriptor is fetched again.
        extra = target.call("register 65536")["addr"]
        eng.write(buf.addr, seg, extra, 4096)
        assert target.digest(extra, 4096) == sha(data[:4096])


def test_clean_close_withdraws_at_once(store, peer_factory):
    kind, url, _ = store
    target = peer_factory("--metadata", url, "--name", "short-lived")
    with TransferEngine("watcher", url) as eng:
        eng.open_segment(target.name)
        target.close()
        if kind == "p2p":  # no store: the peer's listener is gone with it
            with pytest.raises(MetadataError, match="cannot fetch the descriptor"):
                eng._fetch(target.name)
        else:
            with pytest.raises(SegmentError, match="unknown segment 'short-lived'"):
                eng._fetch("short-lived")


@pytest.mark.parametrize("kind", ["etcd", "redis"])
def test_cluster_ids_isolate(kind, tmp_path, peer_factory):
    srv = Store(kind, str(tmp_path)).start()
    try:
        _isolated(kind, srv.url, peer_factory)
    finally:
        srv.stop()


def _isolated(kind, url, peer_factory):
    other = url + ("/blue" if kind == "etcd" else "?cluster=blue")
    peer_factory("--metadata", other, "--name", "same-name")
    with TransferEngine("a", url) as red, TransferEngine("b", other) as blue:
        assert blue.open_segment("same-name").name == "same-name"
        with pytest.raises(SegmentError, match="unknown segment"):
            red.open_segment("same-name")


@pytest.mark.parametrize("kind", ["etcd", "redis"])
def test_crashed_engine_expires_and_restart_is_picked_up(kind, tmp_path, peer_factory):
    srv = Store(kind, str(tmp_path)).start()
    try:
        first = peer_factory("--metadata", srv.url, "--name", "worker", "--ttl", "2")
        with TransferEngine("client", srv.url) as eng:
            data = bytearray(os.urandom(8192))
            buf = eng.register(data)
            seg = eng.open_segment("worker")
            eng.write(buf.addr, seg, first.addr, 4096)
            first.kill()  # kill -9: no goodbye, the lease must run out
            deadline = time.monotonic() + 6
            while time.monotonic() < deadline and eng._meta.fetch("worker") is not None:
                time.sleep(0.2)
            with pytest.raises(SegmentError, match="peer gone"):
                eng._fetch("worker")
            second = peer_factory("--metadata", srv.url, "--name", "worker", "--ttl", "2", "--size", str(1 << 20))
            st = eng.submit([Request(Op.WRITE, buf.addr, seg, second.addr, 4096)]).wait()[0]
            if not st.ok:  # the first try may meet the dead endpoint; the segment is then re-resolved
                eng.write(buf.addr, seg, second.addr, 4096)
            assert second.digest(second.addr, 4096) == sha(data[:4096])
    finally:
        srv.stop()


@pytest.mark.parametrize("kind", ["etcd", "redis"])
def test_store_restart_mid_run(kind, tmp_path, peer_factory):
    srv = Store(kind, str(tmp_path)).start()
    try:
        target = peer_factory("--metadata", srv.url, "--name", "steady", "--ttl", "1.5")
        with TransferEngine("client", srv.url, metadata_ttl=1.5, metadata_timeout=1.0) as eng:
            data = bytearray(os.urandom(65536))
            buf = eng.register(data)
            seg = eng.open_segment("steady")
            srv.stop()
            # Known peers keep working while the store is down...
            for i in range(5):
                eng.write(buf.addr + i, seg, target.addr, 4096)
            assert target.digest(target.addr, 4096) == sha(data[4:4100])
            # ...new lookups fail with a clear error...
            with pytest.raises(MetadataError, match="unreachable|failed"):
                eng.open_segment("someone")
            srv.start()
            # ...and recover when it is back: the engines re-publish (Redis lost everything on restart).
            deadline = time.monotonic() + 10
            while True:
                try:
                    assert eng._fetch("steady").pid == target.pid
                    break
                except (SegmentError, MetadataError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
    finally:
        srv.stop()


def test_credentials_are_not_shown(tmp_path):
    from moonlet.metadata import RedisMetadata

    backend = RedisMetadata("redis://user:s3cret@127.0.0.1:1/0?cluster=c", 0.5, 5)
    assert "s3cret" not in str(backend)
    with pytest.raises(MetadataError) as e:
        backend.fetch("x")
    assert "s3cret" not in str(e.value)
