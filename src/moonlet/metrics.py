"""What an engine has moved, for Prometheus: counted per batch on the data path, exported when scraped.

The data path pays a lock and a few additions when a batch ends (the engine's
:class:`Meter`, nothing per byte or per request in the usual case of a batch
one transport completed whole); the figures become Prometheus metrics only
when a scrape asks for them (:class:`Collector`, through ``prometheus_client``,
the optional ``metrics`` extra). An engine serves them itself with
``EngineConfig.metrics_port``, or an application adds them to the registry it
serves with :func:`register`.

Metrics (every one labelled with ``engine``, the engine's segment name):

- ``moonlet_transfer_bytes_total{op,transport}``: bytes of completed requests;
- ``moonlet_requests_total{op,transport,state}``: requests ended, by state (completed, failed, timeout);
- ``moonlet_request_seconds{op,transport}``: histogram of the time from submit to the end of a batch, one
  observation per batch;
- ``moonlet_batch_requests``: histogram of the number of requests per batch;
- ``moonlet_fallbacks_total{from,to,reason}``: requests a transport handed to another (same-host copies
  refused by the kernel, no RDMA queue pair);
- ``moonlet_connections{transport}``: connections open now (TCP: the listener's and the lanes to peers);
- ``moonlet_registered_bytes{location}``: registered memory, by location (cpu:N, cuda:N);
- ``moonlet_peers``: segments this engine has open.
"""

from __future__ import annotations

import threading
from bisect import bisect_left as _bisect
from collections.abc import Callable, Iterator
from operator import attrgetter
from time import monotonic as _monotonic
from typing import TYPE_CHECKING, Any, NamedTuple

from .batch import Batch, Op, State
from .errors import ConfigError

if TYPE_CHECKING:
    from .engine import TransferEngine

#: Upper bounds (seconds) of the request_seconds histogram's buckets.
SECONDS_BUCKETS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0, 30.0)
#: Upper bounds of the batch_requests histogram's buckets.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384)
_OPS = {Op.WRITE: "write", Op.READ: "read"}
_STATES = {State.COMPLETED: "completed", State.FAILED: "failed", State.TIMEOUT: "timeout"}
_OP, _LENGTH = attrgetter("op"), attrgetter("length")


class _Histogram:
    """Bucket counts, sum and count (exported cumulative, as Prometheus wants them)."""

    __slots__ = ("bounds", "counts", "total", "n")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[_bisect(self.bounds, value)] += 1
        self.total += value
        self.n += 1

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
        return out


class Meter:
    """An engine's counters: updated when a batch ends (:meth:`ended`) and when a transport hands requests to
    another (:meth:`fallback`); read by :class:`Collector`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: the usual batch (one op, one transport, all completed), tallied with the fewest steps: (op,
        #: transport) -> [requests, bytes, seconds bucket counts, seconds sum]; merged in at a scrape
        self._whole: dict[tuple[Op, str], list[Any]] = {}
        self.bytes: dict[tuple[str, str], int] = {}
        self.requests: dict[tuple[str, str, str], int] = {}
        self.seconds: dict[tuple[str, str], _Histogram] = {}
        self.batch_requests = _Histogram(BATCH_BUCKETS)
        self.fallbacks: dict[tuple[str, str, str], int] = {}

    def ended(self, batch: Batch) -> None:
        """``batch`` ended (its engine's unpin callback, holding the batch's lock)."""
        op, lengths, started = batch.meter
        seconds = _monotonic() - started
        whole = batch.carried_whole_by()
        if whole is not None and op is None:  # a list of requests: one op? (C-speed passes, no Python loop)
            assert batch.requests is not None
            ops = set(map(_OP, batch.requests))
            if len(ops) == 1:
                op, lengths = ops.pop(), list(map(_LENGTH, batch.requests))
        n = len(batch)
        sizes = self.batch_requests
        with self._lock:
            sizes.counts[_bisect(BATCH_BUCKETS, n)] += 1
            sizes.total += n
            sizes.n += 1
            if whole is not None and op is not None and lengths is not None:  # the usual case: one op, one
                tally = self._whole.get((op, whole))  # transport, all completed
                if tally is None:
                    tally = self._whole[(op, whole)] = [0, 0, [0] * (len(SECONDS_BUCKETS) + 1), 0.0]
                tally[0] += n
                tally[1] += sum(lengths)
                tally[2][_bisect(SECONDS_BUCKETS, seconds)] += 1
                tally[3] += seconds
                return
            seen = set()
            for (req_op, length), (state, transport) in zip(self._requests(batch, op, lengths),
                                                            batch.ended_requests()):
                key = (_OPS[req_op], transport or "none")
                self._add(*key, _STATES.get(state, "failed"), 1, length if state is State.COMPLETED else 0, None)
                seen.add(key)
            for key in seen:  # one observation per batch and (op, transport) it used
                self._histogram(*key).observe(seconds)

    @staticmethod
    def _requests(batch: Batch, op: Op | None, lengths: list[int] | None) -> Iterator[tuple[Op, int]]:
        if op is not None and lengths is not None:
            return ((op, n) for n in lengths)
        assert batch.requests is not None
        return ((r.op, r.length) for r in batch.requests)

    def _add(self, op: str, transport: str, state: str, count: int, nbytes: int, seconds: float | None) -> None:
        key = (op, transport)
        self.requests[(op, transport, state)] = self.requests.get((op, transport, state), 0) + count
        if nbytes:
            self.bytes[key] = self.bytes.get(key, 0) + nbytes
        if seconds is not None:
            self._histogram(op, transport).observe(seconds)

    def _histogram(self, op: str, transport: str) -> _Histogram:
        hist = self.seconds.get((op, transport))
        if hist is None:
            hist = self.seconds[(op, transport)] = _Histogram(SECONDS_BUCKETS)
        return hist

    def fallback(self, source: str, target: str, reason: str, count: int) -> None:
        """``count`` requests went from transport ``source`` to ``target`` because of ``reason``."""
        with self._lock:
            key = (source, target, reason)
            self.fallbacks[key] = self.fallbacks.get(key, 0) + count

    def snapshot(self) -> dict[str, Any]:
        """A consistent copy of every counter (for a scrape)."""
        with self._lock:
            for (op, transport), (count, nbytes, buckets, total) in self._whole.items():
                name = _OPS[op]
                self._add(name, transport, "completed", count, nbytes, None)
                hist = self._histogram(name, transport)
                hist.counts = [a + b for a, b in zip(hist.counts, buckets)]
                hist.total += total
                hist.n += sum(buckets)
            self._whole.clear()
            return {"bytes": dict(self.bytes), "requests": dict(self.requests), "fallbacks": dict(self.fallbacks),
                    "seconds": {k: (h.cumulative(), h.total) for k, h in self.seconds.items()},
                    "batch_requests": (self.batch_requests.cumulative(), self.batch_requests.total)}


class Source(NamedTuple):
    """One engine as a collector sees it: its name (the ``engine`` label), counters and gauges."""

    name: str
    meter: Meter
    gauges: Callable[[], dict[str, Any]]


class Collector:
    """A ``prometheus_client`` collector of every engine added to it: one per registry, so each family is
    written once with a set of samples per engine. Engines leave it when they close."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sources: dict[int, Source] = {}

    def add(self, key: int, source: Source) -> None:
        with self._lock:
            self._sources[key] = source

    def remove(self, key: int) -> None:
        with self._lock:
            self._sources.pop(key, None)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        with self._lock:
            sources = list(self._sources.values())
        seen = [(src.name, src.meter.snapshot(), src.gauges()) for src in sources]
        moved = CounterMetricFamily("moonlet_transfer_bytes", "Bytes of completed requests",
                                    labels=["engine", "op", "transport"])
        ended = CounterMetricFamily("moonlet_requests", "Requests ended, by state",
                                    labels=["engine", "op", "transport", "state"])
        took = HistogramMetricFamily("moonlet_request_seconds", "Time from submit to the end of a batch, one "
                                     "observation per batch", labels=["engine", "op", "transport"])
        sizes = HistogramMetricFamily("moonlet_batch_requests", "Requests per batch", labels=["engine"])
        fell = CounterMetricFamily("moonlet_fallbacks", "Requests a transport handed to another",
                                   labels=["engine", "from", "to", "reason"])
        conns = GaugeMetricFamily("moonlet_connections", "Connections open now", labels=["engine", "transport"])
        memory = GaugeMetricFamily("moonlet_registered_bytes", "Registered memory", labels=["engine", "location"])
        peers = GaugeMetricFamily("moonlet_peers", "Segments this engine has open", labels=["engine"])
        for e, snap, gauges in seen:
            for (op, transport), n in sorted(snap["bytes"].items()):
                moved.add_metric([e, op, transport], n)
            for (op, transport, state), n in sorted(snap["requests"].items()):
                ended.add_metric([e, op, transport, state], n)
            for (op, transport), (buckets, total) in sorted(snap["seconds"].items()):
                took.add_metric([e, op, transport], buckets, total)
            buckets, total = snap["batch_requests"]
            sizes.add_metric([e], buckets, total)
            for (source, target, reason), n in sorted(snap["fallbacks"].items()):
                fell.add_metric([e, source, target, reason], n)
            for transport, n in sorted(gauges["connections"].items()):
                conns.add_metric([e, transport], n)
            for location, n in sorted(gauges["registered"].items()):
                memory.add_metric([e, location], n)
            peers.add_metric([e], gauges["peers"])
        yield from (moved, ended, took, sizes, fell, conns, memory, peers)


_collectors: dict[int, tuple[Any, Collector]] = {}  # id(registry) -> (registry, its moonlet collector)
_collectors_lock = threading.Lock()


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise ConfigError("moonlet's metrics need prometheus_client: pip install 'moonlet[metrics]'") from None
    return prometheus_client


def register(engine: TransferEngine, registry: Any = None) -> Collector:
    """Add ``engine``'s metrics to ``registry`` (default: ``prometheus_client.REGISTRY``), which the
    application serves; counting starts now if it had not. Every engine of the process may be added to the
    same registry: one collector writes them all, labelled by engine, and an engine leaves when it closes."""
    prometheus = _prometheus()
    registry = prometheus.REGISTRY if registry is None else registry
    with _collectors_lock:
        held = _collectors.get(id(registry))
        if held is None or held[0] is not registry:
            collector = Collector()
            registry.register(collector)
            _collectors[id(registry)] = (registry, collector)
        else:
            collector = held[1]
    engine._join_metrics(collector)
    return collector


def serve(engine: TransferEngine, host: str, port: int) -> tuple[Any, str]:
    """Serve ``engine``'s metrics at ``http://host:port/metrics`` from a thread, with a registry of their
    own: the server (``shutdown()`` stops it) and its URL."""
    prometheus = _prometheus()
    registry = prometheus.CollectorRegistry(auto_describe=False)
    collector = Collector()
    registry.register(collector)
    engine._join_metrics(collector)
    try:
        server, _ = prometheus.start_http_server(port, host, registry)
    except OSError as e:
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {e}") from None
    bound_host, bound_port = server.server_address[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    return server, f"http://{shown}:{bound_port}/metrics"
