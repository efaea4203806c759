"""Shared pieces of the hostile-input fuzzers: hostile JSON, live targets and their liveness checks.

The strategies produce JSON *text* (bytes), not Python values, so they can
carry what ``json.dumps`` never writes: numbers like ``1e400`` or with 5000
digits, lone surrogates, bytes that are not UTF-8, nesting 60000 deep,
duplicate keys.  :class:`LiveTarget` is an engine under attack plus an
honest initiator; :meth:`LiveTarget.check` is the liveness check run after
every case: the reactor thread is alive, no thread died of an exception, a
fresh connection moves bytes, an honest engine writes and reads back random
bytes, and the target's memory holds exactly what the honest writes put
there.  A target found dead is rebuilt before the next case, so one killed
reactor does not make every later example fail (and Hypothesis can shrink).

``MOONLET_FUZZ_EXAMPLES`` sets how many cases each target runs (CI: the
default, small; the lab guest: thousands).
"""

from __future__ import annotations

import json
import mmap
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache, lru_cache

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from helpers.engines import transport
from helpers.net import connect, raw_read
from moonlet import EngineConfig, MoonletError, TransferEngine
from moonlet.security import Secret
from moonlet.segment import host_identity, pid_namespace
from moonlet.transport.tcp import protocol as P
from moonlet.transport.tcp.dial import authenticate

EXAMPLES = int(os.environ.get("MOONLET_FUZZ_EXAMPLES", "100"))
SOCKET_TIMEOUT = 3.0
SECRET = "fuzz-cluster-secret-0123456789"
NAME = b"@NAME@"  # replaced by the segment name of the engine under attack when a case is sent
NAME_TEXT = NAME.decode()  # the same, as a JSON string value
U64 = 1 << 64


def fuzz_settings(share: float = 1.0) -> settings:
    """Settings of one fuzz target: ``share`` of ``MOONLET_FUZZ_EXAMPLES`` cases, no deadline, no database."""
    return settings(max_examples=max(5, int(EXAMPLES * share)), deadline=None, derandomize=False, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.large_base_example, HealthCheck.filter_too_much,
                                           HealthCheck.function_scoped_fixture])


class Blob(bytes):
    """Bytes whose repr folds long runs (``b'[' * 60000``), so a failing case prints readably."""

    def __repr__(self) -> str:
        parts: list[str] = []
        literal = bytearray()
        i = 0
        while i < len(self):
            j = i
            while j < len(self) and self[j] == self[i]:
                j += 1
            if j - i >= 8:
                if literal:
                    parts.append(repr(bytes(literal)))
                    literal.clear()
                parts.append(f"{bytes(self[i:i + 1])!r} * {j - i}")
            else:
                literal += self[i:j]
            i = j
        if literal or not parts:
            parts.append(repr(bytes(literal)))
        return " + ".join(parts)


def blob(strategy: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """``strategy`` with its examples shown compactly."""
    return strategy.map(Blob)


def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """One of the strategies, picked with the given weights (``st.one_of`` merges repeated branches)."""
    return st.sampled_from([s for w, s in choices for _ in range(w)]).flatmap(lambda s: s)


# -- hostile JSON text ------------------------------------------------------------------------------

NUMBERS = [b"0", b"-0", b"-1", b"1", b"4096", b"4096.0", b"0.5", b"-9223372036854775809", b"9223372036854775808",
           b"18446744073709551615", b"18446744073709551616", b"1180591620717411303424", b"-1180591620717411303424",
           b"1e400", b"-1e400", b"1E+999", b"1e-400", b"NaN", b"Infinity", b"-Infinity", b"1" + b"0" * 5000,
           b"0x10", b"01", b"1.", b".5", b"+1"]
STRINGS = [b'""', b'"\\ud800"', b'"\\udfff\\ud800"', b'"a\\ud834"', b'"\xff\xfe"', b'"\xc3"', b'"\xed\xa0\x80"',
           b'"\\u0000"', b'"\\"', b'"notify"', b'"cpu:0"', b'"cuda:0"', b'"cpu:-1"', b'"cpu:99999999999"',
           b'"127.0.0.1:0"', b'"127.0.0.1:99999"', b'"[::1]:1"', b'"host:port:x"', b'"127.0.0.1:-1"', b'"/"',
           b'"\xe2\x80\xae"', b'"' + NAME + b'"']
OTHERS = [b"null", b"true", b"false", b"[]", b"{}", b"[[]]", b'{"":{}}', b"", b"{", b"[", b",", b"]", b"\xff",
          b"\x00", b"nul", b'"unterminated']


def _nest(depth: int, opener: str, closed: bool, inner: bytes) -> bytes:
    """``depth`` levels of arrays or objects around ``inner`` (closed or left open)."""
    if opener == "[":
        head, tail = b"[" * depth, b"]" * depth
    else:
        head, tail = b'{"a":' * depth, b"}" * depth
    return head + inner + (tail if closed else b"")


@cache
def deep_values() -> st.SearchStrategy[bytes]:
    """Nesting far past any parser's recursion limit, with the 60000-deep array the issue names."""
    return st.one_of(
        st.just(b"[" * 60000),
        st.builds(_nest, st.sampled_from([990, 1000, 1100, 5000, 12000]) | st.integers(1, 12000),
                  st.sampled_from("[{"), st.booleans(), st.sampled_from([b"1", b""])),
        st.builds(_nest, st.integers(1, 64), st.sampled_from("[{"), st.just(True), st.just(b"0")),
    )


@cache
def long_strings() -> st.SearchStrategy[bytes]:
    return st.builds(lambda n, c: b'"' + c * n + b'"', st.integers(1000, 60000), st.sampled_from([b"x", b"\\u00e9"]))


@cache
def scalars() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.sampled_from(NUMBERS), st.sampled_from(STRINGS), st.sampled_from(OTHERS),
        st.integers(-(1 << 70), 1 << 70).map(lambda n: str(n).encode()),
        st.floats(allow_nan=False, allow_infinity=False).map(lambda f: repr(f).encode()),
        st.text(max_size=16).map(lambda s: json.dumps(s, ensure_ascii=False).encode()),
    )


@cache
def values() -> st.SearchStrategy[bytes]:
    """Any hostile JSON value (text): scalars, small containers of them, deep nesting, long strings."""
    containers = st.recursive(
        scalars(),
        lambda kids: st.one_of(
            st.lists(kids, max_size=4).map(lambda xs: b"[" + b",".join(xs) + b"]"),
            st.lists(st.tuples(st.sampled_from([b'"addr"', b'"length"', b'"name"', b'"x"', b'""']), kids),
                     max_size=4).map(lambda kv: b"{" + b",".join(k + b":" + v for k, v in kv) + b"}"),
        ),
        max_leaves=8,
    )
    return weighted((5, containers), (2, deep_values()), (1, long_strings()))


@dataclass(frozen=True)
class Field:
    """A key of a JSON object: its good values, its hostile ones, and whether a good object may omit it."""

    good: st.SearchStrategy[bytes]
    hostile: st.SearchStrategy[bytes]
    optional: bool = False


def good_or(good: list, optional: bool = False) -> Field:
    """A field whose good values are ``good`` (JSON-encoded unless bytes already)."""
    enc = [g if isinstance(g, bytes) else json.dumps(g).encode() for g in good]
    return Field(st.sampled_from(enc), values(), optional)


def obj(fields: dict[str, Field | st.SearchStrategy[bytes]]) -> st.SearchStrategy[bytes]:
    """A JSON object (text) with the keys a reader looks for.

    Often every key is good (so a reader gets past its checks to the code that uses the values), often
    one key goes wrong (missing, repeated, or a hostile value), and sometimes every key is a coin toss.
    Stray keys may join.
    """
    spec = tuple((k, f if isinstance(f, Field) else Field(f, values())) for k, f in fields.items())
    return _object(spec)


_STRAY = st.lists(st.tuples(st.sampled_from([b'"x"', b'"\\ud800"', b'""', b'"version"']), scalars())
                  .map(lambda kv: kv[0] + b":" + kv[1]), max_size=1)


@st.composite
def _object(draw, spec: tuple) -> bytes:
    names = [k for k, _ in spec]
    mode = draw(st.integers(0, 9))  # 0-5: every key good, 6-8: one key goes wrong, 9: each key a coin toss
    few = mode < 9
    bad = {draw(st.sampled_from(names))} if 6 <= mode <= 8 else set()
    items = []
    for key, f in spec:
        k = json.dumps(key).encode()
        if key in bad if few else draw(st.booleans()):
            how = draw(st.integers(0, 3))  # 0: missing, 1: repeated, else: a hostile value
            if how == 0:
                continue
            items += [k + b":" + draw(f.hostile)] + ([k + b":" + draw(f.good)] if how == 1 else [])
        elif not f.optional or draw(st.booleans()):
            items.append(k + b":" + draw(f.good))
    items += draw(_STRAY)
    return b"{" + b",".join(draw(st.permutations(items))) + b"}"


@cache
def json_texts() -> st.SearchStrategy[bytes]:
    """Any hostile JSON text, or raw bytes."""
    return st.one_of(values(), st.binary(max_size=128))


# -- hostile descriptors ------------------------------------------------------------------------------

HOST = host_identity()
PIDNS = pid_namespace()


@lru_cache(maxsize=64)
def descriptor_texts(buffer_addrs: tuple[int, ...] = (4096,),
                     endpoints: tuple[str, ...] = ("127.0.0.1:1",)) -> st.SearchStrategy[bytes]:
    """Segment descriptors (JSON text) with the right shape and hostile fields.

    ``buffer_addrs``: good-looking addresses to mix in (so some parse and are then used);
    ``endpoints``: good-looking ``host:port`` strings for the endpoints.
    """
    addrs, eps = list(buffer_addrs), list(endpoints)
    addr = st.one_of(st.sampled_from(addrs).map(lambda a: str(a).encode()),
                     st.builds(lambda a, d: str(a + d).encode(), st.sampled_from(addrs), st.integers(-8192, 8192)))
    length = st.sampled_from([b"1", b"64", b"4096", b"8192"])
    hostile_length = st.one_of(st.sampled_from([b"0", b"-1", b"18446744073709551615", b"18446744073709551616",
                                                b"1e400", b"4096.5", b'"64"', b"true"]), values())
    buffer = obj({"addr": Field(addr, values()), "length": Field(length, hostile_length),
                  "location": good_or(["cpu:0", "cpu:0", "cuda:0"]),
                  "remote_read": good_or([True, False], optional=True),
                  "remote_write": good_or([True, False], optional=True),
                  "memfd": good_or([3, 0, -1, 1 << 40, "../../self/fd/0"], optional=True),
                  "gpu": good_or(["GPU-0"], optional=True), "ipc": good_or(["00" * 64], optional=True),
                  "ipc_base": good_or([4096], optional=True),
                  "rkeys": good_or([{"mlx5_0": [1, 2]}, {"mlx5_0": 7}, {"": []}], optional=True)})
    buffers = st.lists(buffer, min_size=1, max_size=3).map(lambda bs: b"[" + b",".join(bs) + b"]")
    endpoint_map = obj({"tcp": good_or(eps), "shm": good_or(eps, optional=True),
                        "local": good_or(eps, optional=True),
                        "mooncake_tcp": good_or(["127.0.0.1:1;v2", "x;v", "127.0.0.1:1;v99999999999999999999"],
                                                optional=True),
                        "cuda_ipc": good_or(eps, optional=True), "rdma": good_or(eps, optional=True)})
    nic = obj({"name": good_or(["mlx5_0"]), "port": good_or([1]), "gid": good_or(["fe80::1"]),
               "lid": good_or([0]), "mtu": good_or([4096]), "numa": good_or([0, -1], optional=True)})
    descriptor = obj({"version": good_or([1]), "name": good_or([NAME_TEXT]), "instance": good_or(["fuzz-instance"]),
             "host": good_or([HOST, "elsewhere"]), "pid": good_or([os.getpid(), 1, 0, -1]),
             "pidns": good_or([PIDNS, ""], optional=True), "generation": good_or([0, 1], optional=True),
             "control": good_or([None, {"memfd": 3, "addr": 4096}, {"memfd": 0}], optional=True),
             "endpoints": Field(endpoint_map, values()), "transports": good_or([["tcp"]], optional=True),
             "buffers": Field(buffers, values()),
             "nics": Field(st.lists(nic, max_size=2).map(lambda n: b"[" + b",".join(n) + b"]"), values(),
                           optional=True)})
    return blob(weighted((4, descriptor), (1, values()), (1, st.binary(max_size=256))))


def check_descriptor(desc) -> None:
    """What a descriptor accepted from a peer or a store must guarantee to the code that uses it."""
    assert isinstance(desc.name, str) and isinstance(desc.instance, str) and isinstance(desc.host, str)
    assert type(desc.pid) is int
    assert isinstance(desc.endpoints, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in desc.endpoints.items())
    for b in desc.buffers:
        a, n = b["addr"], b["length"]
        assert type(a) is int and type(n) is int, f"buffer address/length not ints: {b!r}"
        assert 0 <= a < U64 and 0 < n <= U64 and a + n <= U64, \
            f"buffer [{a}, +{n}) is not a non-empty range of the 64-bit address space: {b!r}"
        assert isinstance(b["location"], str) and type(b["remote_read"]) is bool and type(b["remote_write"]) is bool


# -- frames ---------------------------------------------------------------------------------------------

def control_frame(kind: int, body: bytes, req_id: int = 0, announced: int | None = None) -> bytes:
    """A control frame; ``announced`` (if given) is the payload length the prefix claims instead of the truth."""
    n = len(body) if announced is None else min(announced, U64 - 1)
    return P.PREFIX.pack(P.MAGIC, P.VERSION, kind, 0, req_id, n) + body


@dataclass(frozen=True)
class Control:
    """A control frame to send, framed only then: once :data:`NAME` in its body is the target's name."""

    kind: int
    body: bytes
    lie: int = 0  # the prefix announces len(body) + lie payload bytes
    req_id: int = 0
    cut: int = 0  # bytes cut off the end of the frame

    def encode(self, name: bytes) -> bytes:
        body = self.body.replace(NAME, name)
        frame = control_frame(self.kind, body, self.req_id, max(0, len(body) + self.lie) if self.lie else None)
        return frame[:max(0, len(frame) - self.cut)]


def pad(body: bytes, floor: int = P.MIN_TARGET_TAIL) -> bytes:
    """``body`` padded with JSON whitespace to the smallest body a target reads."""
    return body.ljust(floor)


def drain(sock: socket.socket, timeout: float = SOCKET_TIMEOUT) -> bytes:
    """Half-close ``sock`` and read until the peer closes, a reset, or ``timeout`` (bounded, never raises)."""
    got = bytearray()
    deadline = time.monotonic() + timeout
    try:
        sock.shutdown(socket.SHUT_WR)
        while time.monotonic() < deadline and len(got) < (64 << 20):
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            got += chunk
    except OSError:
        pass
    return bytes(got)


def check_replies(data: bytes) -> None:
    """Whatever a target answered must be well-formed moonlet frames (a cut-off tail aside)."""
    for ev in P.FrameReader(initiator=True, control=True).feed(data):
        if isinstance(ev, P.Frame) and ev.kind == P.ERROR:
            ev.body.decode()  # a clear error: UTF-8 text


# -- thread deaths ----------------------------------------------------------------------------------------

class ThreadDeaths:
    """Records every exception that ends a thread while installed (``threading.excepthook``)."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self._old = threading.excepthook

    def __enter__(self) -> ThreadDeaths:
        def hook(args: threading.ExceptHookArgs) -> None:
            name = args.thread.name if args.thread is not None else "?"
            self.seen.append(f"thread {name!r} died: {args.exc_type.__name__}: {str(args.exc_value)[:300]}")
            self._old(args)
        threading.excepthook = hook
        return self

    def __exit__(self, *exc: object) -> None:
        threading.excepthook = self._old

    def take(self) -> list[str]:
        out, self.seen = self.seen, []
        return out


# -- a live target and its liveness check --------------------------------------------------------------

MEM_SIZE = 256 << 10
HONEST_SPAN = 4096  # the honest initiator writes here (offset 0), and nowhere else


class LiveTarget:
    """An engine under attack, its registered memory, and an honest initiator that checks it still works.

    ``mem`` (random, writable) is registered; a page of random bytes is registered read-only between
    unregistered guard pages (two on each side), so no descriptor lie can make a write to it, or near it,
    legitimate.
    ``shadow`` is what ``mem`` must hold: its first bytes change only by the honest writes.
    """

    def __init__(self, **config: object) -> None:
        self.config = dict(spin_us=0, request_timeout=5.0, connect_timeout=3.0, **config)
        self.secret = Secret(str(config["secret"]).encode()) if config.get("secret") else None
        self.deaths = ThreadDeaths().__enter__()
        self.engine: TransferEngine | None = None
        self.honest: TransferEngine | None = None
        self.broken = True
        self.ready()

    # -- lifecycle
    def _start(self) -> None:
        self.engine = TransferEngine(config=EngineConfig(**self.config))
        self.mem = bytearray(os.urandom(MEM_SIZE))
        self.buf = self.engine.register(self.mem)
        self.shadow = bytes(self.mem)
        page = mmap.PAGESIZE  # the poisoned descriptors aim within 8 KiB (+64 bytes) of the read-only page
        self._ro_map = mmap.mmap(-1, 5 * page)
        self._ro_map[:] = os.urandom(5 * page)
        self.ro_buf = self.engine.register(memoryview(self._ro_map)[2 * page:3 * page], remote_write=False)
        self.ro_shadow = bytes(self._ro_map)
        cfg = {k: v for k, v in self.config.items() if k in ("secret", "spin_us", "request_timeout",
                                                                "connect_timeout")}
        self.honest = TransferEngine(config=EngineConfig(transports=("tcp",), **cfg))
        self.local = bytearray(os.urandom(2 * HONEST_SPAN))
        self.local_buf = self.honest.register(self.local)
        self.broken = False
        self.server = transport(self.engine, "tcp").server

    def close(self) -> None:
        for eng in (self.honest, self.engine):
            if eng is not None:
                try:
                    eng.close()
                except Exception:  # a target whose reactor died may not close cleanly: nothing to keep
                    pass
        self.engine = self.honest = None

    def shutdown(self) -> None:
        self.close()
        self.deaths.__exit__()

    def ready(self) -> LiveTarget:
        """Rebuild the target if the last check found it dead or damaged; forget thread deaths seen so far
        (every installed hook sees every death: another target's belong to its own test)."""
        if self.broken:
            self.close()
            self._start()
        self.deaths.take()
        return self

    @property
    def name(self) -> str:
        assert self.engine is not None
        return self.engine.name

    def connect(self, authed: bool = True) -> socket.socket:
        """A fresh connection to the target (authenticated when it has a secret and ``authed``)."""
        sock = connect(self.name, SOCKET_TIMEOUT)
        if authed and self.secret is not None:
            authenticate(sock, self.secret, self.name)
        return sock

    # -- the liveness check
    def check(self, extra: Callable[[], None] | None = None) -> None:
        """Assert the target survived the last case; mark it for rebuilding if it did not."""
        try:
            self._check()
            if extra is not None:
                extra()
        except BaseException:
            self.broken = True
            raise

    def _reactor_state(self) -> str | None:
        """What is wrong with the target's reactor, or None: an uncaught exception in any thread, the
        reactor's own ``failure`` record (where the reactor keeps one), or its thread gone."""
        deaths = self.deaths.take()
        if deaths:
            return "; ".join(deaths)
        failure = getattr(self.server, "failure", None)
        if failure is not None:
            return f"the target's reactor failed: {failure!r}"
        loops = getattr(getattr(self.server, "_shared", None), "loops", None)
        if loops is None:  # another kind of server: its own thread
            loops = [self.server]
        alive = all(loop._thread.is_alive() for loop in loops)
        return None if alive else "a reactor thread of the target is dead"

    def _check(self) -> None:
        broken = self._reactor_state()
        assert broken is None, broken
        try:
            self._transfers()
        except (OSError, MoonletError, AssertionError) as e:
            time.sleep(0.2)  # a dying reactor's thread may still be on its way out: let it say why
            raise AssertionError(f"the target no longer serves: {type(e).__name__}: {e}"
                                 f" ({self._reactor_state() or 'its reactor thread still runs'})") from e
        assert bytes(self.mem) == self.shadow, "the target's registered memory changed beyond the honest writes"
        assert bytes(self._ro_map) == self.ro_shadow, "the target's read-only memory (or its guard pages) changed"
        broken = self._reactor_state()
        assert broken is None, broken

    def _transfers(self) -> None:
        """A fresh raw connection READs random bytes the target holds; an honest engine writes random bytes
        and reads them back."""
        off = 1000 + int.from_bytes(os.urandom(2), "little") % (MEM_SIZE - 2000)
        with self.connect() as sock:
            reply = raw_read(sock, self.buf.addr + off, 512, req_id=7)
        p = P.parse_prefix(reply)
        assert (p.kind, p.req_id, reply[P.PREFIX_SIZE]) == (P.RESP, 7, 0), f"bad answer to a good READ: {reply[:40]!r}"
        assert reply[P.PREFIX_SIZE + 1:] == self.shadow[off:off + 512], "a good READ returned the wrong bytes"
        assert self.honest is not None
        data = os.urandom(HONEST_SPAN)
        self.local[:HONEST_SPAN] = data
        seg = self.honest.open_segment(self.name)
        self.honest.write(self.local_buf.addr, seg, self.buf.addr, HONEST_SPAN, timeout=5)
        self.honest.read(self.local_buf.addr + HONEST_SPAN, seg, self.buf.addr, HONEST_SPAN, timeout=5)
        assert bytes(self.local[HONEST_SPAN:]) == data, "an honest write + read did not return the bytes written"
        self.shadow = data + self.shadow[HONEST_SPAN:]


@contextmanager
def live_target(**config: object) -> Iterator[LiveTarget]:
    t = LiveTarget(**config)
    try:
        yield t
    finally:
        t.shutdown()


def u64(n: int) -> bytes:
    return struct.pack("<Q", n)
