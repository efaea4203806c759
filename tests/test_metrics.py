"""Prometheus metrics: scraped over real HTTP after known transfers, the counters say what moved."""

from __future__ import annotations

import os
import urllib.request

import pytest

from helpers.engines import initiator
from helpers.memory import sha
from moonlet import ConfigError, EngineConfig, Op, Request, State, TransferEngine
from moonlet.transport.shm import cma

prometheus_client = pytest.importorskip("prometheus_client")  # the `metrics` extra; `test` installs it
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

KiB = 1024


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample at ``url`` (an HTTP GET, as Prometheus does): (name, sorted labels) -> value."""
    with urllib.request.urlopen(url, timeout=5) as r:
        assert r.status == 200
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_counters_match_what_moved_over_tcp():
    with initiator() as target, initiator(metrics_port=0) as eng:
        assert eng.metrics_url is not None and eng.metrics_url.endswith("/metrics")
        remote = bytearray(os.urandom(1 << 20))
        rbuf = target.register(remote)
        ro = target.register(bytearray(os.urandom(64 * KiB)), remote_write=False)
        local = bytearray(os.urandom(1 << 20))
        lbuf = eng.register(local)
        seg = eng.open_segment(target.name)
        # 3 array batches of 5 x 64 KiB writes, 1 list batch of 7 x 4 KiB reads, 1 refused write
        for k in range(3):
            addrs = [i * 128 * KiB for i in range(5)]
            st = eng.submit_many(Op.WRITE, seg, [lbuf.addr + a for a in addrs],
                                 [rbuf.addr + a + k * 4 * KiB for a in addrs], [64 * KiB] * 5).wait()
            assert all(s.ok for s in st)
        st = eng.submit([Request(Op.READ, lbuf.addr + i * 8 * KiB, seg, rbuf.addr + i * 8 * KiB, 4 * KiB)
                         for i in range(7)]).wait()
        assert all(s.ok for s in st)
        assert local[:4 * KiB] == remote[:4 * KiB]
        st = eng.submit([Request(Op.WRITE, lbuf.addr, seg, ro.addr, 4 * KiB)]).wait()
        assert st[0].state is State.FAILED
        st = eng.submit([Request(Op.READ, lbuf.addr, seg, rbuf.addr + (1 << 20), 16)]).wait()  # fails at submit
        assert st[0].state is State.FAILED
        s = scrape(eng.metrics_url)
        name = eng.name
        assert sample(s, "moonlet_transfer_bytes_total", engine=name, op="write", transport="tcp") == 15 * 64 * KiB
        assert sample(s, "moonlet_transfer_bytes_total", engine=name, op="read", transport="tcp") == 7 * 4 * KiB
        assert sample(s, "moonlet_requests_total", engine=name, op="write", transport="tcp", state="completed") == 15
        assert sample(s, "moonlet_requests_total", engine=name, op="read", transport="tcp", state="completed") == 7
        assert sample(s, "moonlet_requests_total", engine=name, op="write", transport="tcp", state="failed") == 1
        assert sample(s, "moonlet_request_seconds_count", engine=name, op="write", transport="tcp") == 4
        assert sample(s, "moonlet_request_seconds_count", engine=name, op="read", transport="tcp") == 1
        assert sample(s, "moonlet_requests_total", engine=name, op="read", transport="none", state="failed") == 1
        assert sample(s, "moonlet_batch_requests_count", engine=name) == 6
        assert sample(s, "moonlet_batch_requests_sum", engine=name) == 15 + 7 + 1 + 1
        assert sample(s, "moonlet_batch_requests_bucket", engine=name, le="4.0") == 2  # the two refused
        assert sample(s, "moonlet_batch_requests_bucket", engine=name, le="8.0") == 6
        assert sample(s, "moonlet_registered_bytes", engine=name, location=lbuf.location) == 1 << 20
        assert sample(s, "moonlet_peers", engine=name) == 1
        assert sample(s, "moonlet_connections", engine=name, transport="tcp") >= 1
    with pytest.raises(OSError):  # closing the engine stops its endpoint
        urllib.request.urlopen(eng.metrics_url, timeout=2)


@pytest.mark.skipif(not cma.AVAILABLE, reason="process_vm_readv/writev need Linux")
def test_counters_match_what_moved_over_shm(peer_factory):
    target = peer_factory()
    shared = target.call("allocate 1048576")["addr"]  # allocate(): the mapped path; the peer's other buffer:
    with TransferEngine(config=EngineConfig(transports=("shm", "tcp"), metrics_port=0)) as eng:  # attached
        local = bytearray(os.urandom(1 << 20))
        lbuf = eng.register(local)
        seg = eng.open_segment(target.name)
        st = eng.submit_many(Op.WRITE, seg, [lbuf.addr + i * 8 * KiB for i in range(16)],
                             [target.addr + i * 8 * KiB for i in range(16)], [4 * KiB] * 16).wait()
        assert {x.transport for x in st} == {"shm"} and all(x.ok for x in st)
        st = eng.submit_many(Op.WRITE, seg, [lbuf.addr], [shared], [1 << 20]).wait()
        assert st[0].ok and target.digest(shared, 1 << 20) == sha(local)
        st = eng.submit([Request(Op.READ, lbuf.addr, seg, target.addr + 3, 100 * KiB)]).wait()
        assert st[0].ok and st[0].transport == "shm"
        s = scrape(eng.metrics_url)
        name = eng.name
        assert sample(s, "moonlet_transfer_bytes_total", engine=name, op="write", transport="shm") == \
            16 * 4 * KiB + (1 << 20)
        assert sample(s, "moonlet_transfer_bytes_total", engine=name, op="read", transport="shm") == 100 * KiB
        assert sample(s, "moonlet_requests_total", engine=name, op="write", transport="shm", state="completed") == 17


def test_fallbacks_are_counted(peer_factory):
    from test_same_host import refusing_target  # a target the kernel will not let attach to this process

    with refusing_target(peer_factory) as (target, eng, mem, buf, seg):
        from moonlet import metrics

        registry = prometheus_client.CollectorRegistry()
        metrics.register(eng, registry)  # into a registry the application serves itself
        st = eng.submit([Request(Op.WRITE, buf.addr + i * 4096, seg, target.addr + i * 4096, 4096)
                         for i in range(16)]).wait()
        assert all(x.ok and x.transport == "tcp" for x in st)
        text = prometheus_client.generate_latest(registry).decode()
        s = {(x.name, tuple(sorted(x.labels.items()))): x.value
             for family in text_string_to_metric_families(text) for x in family.samples}
        assert sample(s, "moonlet_fallbacks_total", engine=eng.name, **{"from": "shm", "to": "tcp"},
                      reason="attach refused") == 16
        assert sample(s, "moonlet_transfer_bytes_total", engine=eng.name, op="write", transport="tcp") == 16 * 4096


def test_a_taken_metrics_port_is_a_clear_error():
    with initiator(metrics_port=0) as eng:
        port = int(eng.metrics_url.rsplit(":", 1)[1].split("/")[0])
        with pytest.raises(ConfigError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            initiator(metrics_port=port)
    with pytest.raises(ConfigError, match="metrics_port must be in 0..65535"):
        EngineConfig(metrics_port=70000)


def test_engines_of_one_process_share_a_registry():
    """Each family written once, one set of samples per engine; an engine leaves the registry when it closes."""
    from moonlet import metrics

    registry = prometheus_client.CollectorRegistry(auto_describe=True)  # as prometheus_client.REGISTRY is
    with initiator() as target, initiator() as a, initiator() as b:
        rbuf = target.register(bytearray(os.urandom(64 * KiB)))
        for eng in (a, b):
            metrics.register(eng, registry)
        moved = {}
        for eng, n in ((a, 3), (b, 5)):
            lbuf = eng.register(bytearray(os.urandom(64 * KiB)))
            seg = eng.open_segment(target.name)
            assert all(x.ok for x in eng.submit_many(Op.WRITE, seg, [lbuf.addr] * n, [rbuf.addr] * n,
                                                     [4 * KiB] * n).wait())
            moved[eng.name] = n * 4 * KiB
        text = prometheus_client.generate_latest(registry).decode()
        assert text.count("# TYPE moonlet_transfer_bytes_total counter") == 1
        s = {(x.name, tuple(sorted(x.labels.items()))): x.value
             for family in text_string_to_metric_families(text) for x in family.samples}
        for name, n in moved.items():
            assert sample(s, "moonlet_transfer_bytes_total", engine=name, op="write", transport="tcp") == n
        gone = a.name
        a.close()
        text = prometheus_client.generate_latest(registry).decode()
        assert f'engine="{gone}"' not in text and f'engine="{b.name}"' in text
