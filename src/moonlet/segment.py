"""Segment descriptors: what an engine tells the world about itself.

A descriptor names the engine, says how to reach it (endpoints per
transport), which host and process it runs in (so peers can pick same-host
paths), and which buffers it has registered.  It is plain JSON so that any
metadata store can keep it.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import re
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn

from . import boundedjson
from .errors import SegmentError

if TYPE_CHECKING:
    from .memory import PeerMapping

DESCRIPTOR_VERSION = 1


def pid_namespace() -> str:
    """Identity of this process's PID namespace (pids mean the same thing only inside one)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def host_identity() -> str:
    """A stable id of this host's kernel instance: machine-id + boot-id, hashed.

    Two processes with the same id share physical memory, whatever their IP
    addresses look like.
    """
    parts = [socket.gethostname()]
    for path in ("/etc/machine-id", "/proc/sys/kernel/random/boot_id"):
        try:
            with open(path) as f:
                parts.append(f.read().strip())
        except OSError:
            pass
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


@dataclass
class SegmentDescriptor:
    """The published description of one engine."""

    name: str
    instance: str
    host: str
    pid: int
    endpoints: dict[str, str]
    buffers: list[dict[str, Any]] = field(default_factory=list)
    pidns: str = ""  # PID namespace: same-host copies need the same one
    generation: int = 0  # bumped by every unregister
    control: dict[str, Any] | None = None  # {"memfd", "addr"}: a page whose first word is the live generation
    nics: list[dict[str, Any]] = field(default_factory=list)  # RDMA NICs: name, port, gid, lid, mtu, numa

    @property
    def transports(self) -> list[str]:
        return sorted(self.endpoints)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able form (what :meth:`to_json` writes)."""
        return {
            "version": DESCRIPTOR_VERSION,
            "name": self.name,
            "instance": self.instance,
            "host": self.host,
            "pid": self.pid,
            "pidns": self.pidns,
            "generation": self.generation,
            "control": self.control,
            "endpoints": self.endpoints,
            "transports": self.transports,
            "buffers": self.buffers,
            **({"nics": self.nics} if self.nics else {}),
        }

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes | str | dict[str, Any]) -> SegmentDescriptor:
        """Parse and validate a descriptor; raise :class:`SegmentError` naming the field on anything malformed.

        The bytes come from a peer or a metadata store, so they are hostile
        until checked: their size and nesting are bounded before they are
        parsed, and every field must have its type (integers are ints, never
        floats or bools) and its range (addresses and lengths within the
        64-bit address space, lengths above 0, strings and the counts of
        buffers and NICs bounded), so nothing malformed gets past here to fail
        later in a transport.  Unknown fields are ignored (newer versions may add some).
        """
        d = _parse(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data) \
            if isinstance(data, (bytes, bytearray, str)) else data
        if type(d) is not dict:
            raise SegmentError(f"malformed segment descriptor: not a JSON object but {type(d).__name__}")
        version = d.get("version")
        if type(version) is not int or version != DESCRIPTOR_VERSION:
            raise SegmentError(f"unsupported segment descriptor version {_shown(version)}")
        endpoints = _object(d.get("endpoints", _MISSING), ("endpoints",), MAX_ENDPOINTS)
        for k, v in endpoints.items():
            _text(k, ("endpoints key",), 64)
            _text(v, ("endpoints", k))
        control = d.get("control")
        if control is not None:
            _object(control, ("control",), 16)
            control = {"memfd": _int(control.get("memfd", _MISSING), ("control", "memfd"), *_FD),
                       "addr": _int(control.get("addr", _MISSING), ("control", "addr"), *_ADDR)}
        buffers = _list(d.get("buffers", _MISSING), ("buffers",), MAX_BUFFERS)
        nics = _list(d.get("nics", []), ("nics",), MAX_NICS)
        return cls(
            name=_text(d.get("name", _MISSING), ("name",)),
            instance=_text(d.get("instance", _MISSING), ("instance",)),
            host=_text(d.get("host", _MISSING), ("host",)),
            pid=_int(d.get("pid", _MISSING), ("pid",), *_PID),
            endpoints=dict(endpoints),
            buffers=[_buffer(b, i) for i, b in enumerate(buffers)],
            pidns=_text(d.get("pidns", ""), ("pidns",)),
            generation=_int(d.get("generation", 0), ("generation",), 0, (1 << 63) - 1),
            control=control,
            nics=[_nic(n, i) for i, n in enumerate(nics)],
        )


# -- validation of descriptors from peers and stores ------------------------------------------------------
# The checks take the field's path as a tuple, ("buffers", 3, "addr"), made into text only for an error.
_Path = tuple[str | int, ...]

#: Largest descriptor accepted (JSON bytes): some 100 to 300 bytes a buffer, so about 100,000 buffers.
MAX_DESCRIPTOR_BYTES = 16 << 20
#: Deepest nesting accepted; a descriptor's deepest value (a buffer's RDMA keys) is 5 levels down.
MAX_DEPTH = 8
MAX_BUFFERS = 1 << 17
MAX_NICS = 64
MAX_ENDPOINTS = 32
MAX_TEXT = 4096  # characters of a string field (names, hosts, endpoints)
_U64 = 1 << 64
_ADDR = (0, _U64 - 1)
_FD = (0, (1 << 31) - 1)
_PID = (0, (1 << 31) - 1)
_RKEY = (0, (1 << 32) - 1)
_MISSING = object()  # a field that is not there
_LOCATION = re.compile(r"(cpu|cuda):[0-9]{1,6}")
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})*")


def _parse(data: bytes) -> object:
    """``json.loads(data)`` once its size and nesting are checked (:mod:`moonlet.boundedjson`): no
    RecursionError, no huge parse; SegmentError naming the problem."""
    if len(data) > MAX_DESCRIPTOR_BYTES:
        raise SegmentError(f"segment descriptor of {len(data)} bytes refused: at most {MAX_DESCRIPTOR_BYTES}")
    try:
        return boundedjson.loads(data, MAX_DESCRIPTOR_BYTES, MAX_DEPTH)
    except ValueError as e:
        raise SegmentError(f"malformed segment descriptor: {e}") from None


def _shown(value: object) -> str:
    """``value`` for an error message, short (no megabytes, no number too long to print)."""
    if type(value) is int and value.bit_length() > 128:
        return f"<an integer of {value.bit_length()} bits>"
    return repr(value)[:80]


def _fail(path: _Path, problem: str) -> NoReturn:
    name = str(path[0])
    for before, p in zip(path, path[1:]):
        name += f"[{p}]" if type(p) is int else f"[{p!r}]" if before in ("endpoints", "rkeys") else f".{p}"
    raise SegmentError(f"malformed segment descriptor: {name} {problem}")


def _int(value: object, path: _Path, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        if value is _MISSING:
            _fail(path, "is missing")
        if type(value) is not int:
            _fail(path, f"must be an integer, got {type(value).__name__} {_shown(value)}")
        _fail(path, f"= {_shown(value)} is outside {lo}..{hi}")
    return value


def _text(value: object, path: _Path, limit: int = MAX_TEXT) -> str:
    if type(value) is not str or len(value) > limit:
        if value is _MISSING:
            _fail(path, "is missing")
        if type(value) is not str:
            _fail(path, f"must be a string, got {type(value).__name__}")
        _fail(path, f"is {len(value)} characters long, at most {limit}")
    return value


def _hex(value: object, path: _Path, limit: int) -> str:
    text = _text(value, path, limit)
    if not _HEX.fullmatch(text):
        _fail(path, f"must be hex bytes, got {_shown(value)}")
    return text


def _flag(value: object, path: _Path) -> bool:
    if type(value) is not bool:
        _fail(path, f"must be true or false, got {_shown(value)}")
    return value


def _object(value: object, path: _Path, limit: int) -> dict[str, Any]:
    """``value`` if it is a dict of at most ``limit`` entries."""
    if type(value) is dict and len(value) <= limit:
        return value
    _unsized(value, path, dict, limit)


def _list(value: object, path: _Path, limit: int) -> list[Any]:
    """``value`` if it is a list of at most ``limit`` entries."""
    if type(value) is list and len(value) <= limit:
        return value
    _unsized(value, path, list, limit)


def _unsized(value: object, path: _Path, kind: type[dict[str, Any]] | type[list[Any]], limit: int) -> NoReturn:
    """Fail naming why ``value`` is not a ``kind`` (dict or list) of at most ``limit`` entries."""
    if value is _MISSING:
        _fail(path, "is missing")
    if type(value) is not kind or not isinstance(value, (dict, list)):
        _fail(path, f"must be {'an object' if kind is dict else 'a list'}, got {type(value).__name__}")
    _fail(path, f"has {len(value)} entries, at most {limit}")


def _buffer(b: object, i: int) -> dict[str, Any]:
    """One registered buffer, its rights, and the optional keys telling peers how to reach it directly:
    memfd (same-host mapping), gpu (UUID), ipc and ipc_base (CUDA IPC handle of the allocation), rkeys
    (RDMA remote keys per NIC name, best NIC first)."""
    if type(b) is not dict:
        _fail(("buffers", i), f"must be an object, got {type(b).__name__}")
    addr = _int(b.get("addr", _MISSING), ("buffers", i, "addr"), *_ADDR)
    # The end may be 2**64 (exclusive); the length itself must fit in 64 bits.
    length = _int(b.get("length", _MISSING), ("buffers", i, "length"), 1, _U64 - (addr or 1))
    location = _text(b.get("location", _MISSING), ("buffers", i, "location"), 16)
    if not _LOCATION.fullmatch(location):
        _fail(("buffers", i, "location"), f"{location!r} is not 'cpu:N' or 'cuda:N'")
    out = {"addr": addr, "length": length, "location": location,
           "remote_read": _flag(b.get("remote_read", True), ("buffers", i, "remote_read")),
           "remote_write": _flag(b.get("remote_write", True), ("buffers", i, "remote_write"))}
    if "memfd" in b:
        out["memfd"] = _int(b["memfd"], ("buffers", i, "memfd"), *_FD)
    if "gpu" in b:
        out["gpu"] = _text(b["gpu"], ("buffers", i, "gpu"), 128)
    if "ipc" in b:
        out["ipc"] = _hex(b["ipc"], ("buffers", i, "ipc"), 1024)
    if "ipc_base" in b:
        out["ipc_base"] = _int(b["ipc_base"], ("buffers", i, "ipc_base"), *_ADDR)
    if "rkeys" in b:
        rkeys = _object(b["rkeys"], ("buffers", i, "rkeys"), MAX_NICS)
        out["rkeys"] = {_text(nic, ("buffers", i, "rkeys NIC name"), 64): _rkeys(keys, i, nic)
                        for nic, keys in rkeys.items()}
    return out


def _rkeys(keys: object, i: int, nic: str) -> list[int]:
    """A NIC's remote keys of a buffer, one per registered region (one key alone is taken as a list of one)."""
    path = ("buffers", i, "rkeys", nic)
    if type(keys) is not list:
        return [_int(keys, path, *_RKEY)]
    return [k if type(k) is int and 0 <= k <= _RKEY[1] else _int(k, path, *_RKEY)
            for k in _list(keys, path, MAX_BUFFERS)]


def _nic(n: object, i: int) -> dict[str, Any]:
    if type(n) is not dict:
        _fail(("nics", i), f"must be an object, got {type(n).__name__}")
    return {"name": _text(n.get("name", _MISSING), ("nics", i, "name"), 64),
            "port": _int(n.get("port", _MISSING), ("nics", i, "port"), 0, 255),
            "gid": _hex(n.get("gid", _MISSING), ("nics", i, "gid"), 64),
            "lid": _int(n.get("lid", _MISSING), ("nics", i, "lid"), 0, 0xFFFF),
            "mtu": _int(n.get("mtu", _MISSING), ("nics", i, "mtu"), 0, 1 << 20),
            "numa": _int(n.get("numa", -1), ("nics", i, "numa"), -1, 1 << 16)}


class RemoteBuffer(NamedTuple):
    """A peer's registered buffer, as its descriptor (checked) describes it: made once per descriptor,
    read-only.

    ``end`` (``addr + length``) and ``is_host`` (host memory) are worked out once, for the per-request
    checks; ``memfd``, ``gpu``, ``ipc``, ``ipc_base`` and ``rkeys`` are None where the peer publishes none.
    """

    addr: int
    length: int
    end: int
    location: str
    is_host: bool
    remote_read: bool
    remote_write: bool
    memfd: int | None
    gpu: str | None
    ipc: str | None
    ipc_base: int | None
    rkeys: Mapping[str, list[int]] | None

    @classmethod
    def of(cls, entry: dict[str, Any]) -> RemoteBuffer:
        """``entry``: one of :attr:`SegmentDescriptor.buffers` (as ``from_json`` checked it)."""
        addr, length, location, rkeys = entry["addr"], entry["length"], entry["location"], entry.get("rkeys")
        return cls(addr, length, addr + length, location, location.startswith("cpu:"),
                   entry.get("remote_read", True), entry.get("remote_write", True), entry.get("memfd"),
                   entry.get("gpu"), entry.get("ipc"), entry.get("ipc_base"),
                   None if rkeys is None else MappingProxyType(rkeys))


class Segment:
    """A handle on a peer engine, as returned by ``open_segment``.

    It caches the peer's descriptor; the engine refreshes it when a request
    names memory the cached copy does not know (the peer may have registered
    more since) or when the peer's instance changed (it restarted).
    """

    def __init__(self, name: str, descriptor: SegmentDescriptor) -> None:
        self.name = name
        self._lock = threading.Lock()
        #: for a same-host peer: a mapping of its generation page (set by the engine)
        self.watch: PeerMapping | None = None
        self.update(descriptor)

    def stale(self) -> bool:
        """Whether the peer unregistered memory since this descriptor was fetched (same host only)."""
        watch = self.watch
        return watch is not None and watch.word() != self.descriptor.generation

    def update(self, descriptor: SegmentDescriptor) -> None:
        """Take ``descriptor`` as the peer's current one (the engine does, when it fetches it again)."""
        with self._lock:
            self.descriptor = descriptor
            bufs = sorted((RemoteBuffer.of(b) for b in descriptor.buffers), key=lambda b: b.addr)
            self._starts = [b.addr for b in bufs]
            self._bufs = bufs
            self._last: RemoteBuffer | None = None  # the last buffer find() returned

    def find(self, addr: int, length: int) -> RemoteBuffer | None:
        """The cached remote buffer holding ``[addr, addr+length)``, or None."""
        b = self._last  # requests mostly hit the buffer the previous one did
        if b is not None and b.addr <= addr and addr + length <= b.end:
            return b
        with self._lock:
            i = bisect.bisect_right(self._starts, addr) - 1
            if i < 0:
                return None
            b = self._bufs[i]
            if addr + length > b.end:
                return None
            self._last = b
            return b

    def miss(self, addr: int, length: int) -> str:
        """Why no buffer of the peer holds ``[addr, addr+length)``: by how much it overruns the one its start
        lies in (as the peer last described its buffers)."""
        with self._lock:
            i = bisect.bisect_right(self._starts, addr) - 1
            buf = self._bufs[i] if i >= 0 else None
        if buf is None or addr >= buf.end:
            return f"none of its buffers holds the start {addr:#x}"
        return f"it overruns buffer [{buf.addr:#x}, +{buf.length}) by {addr + length - buf.end} byte(s)"

    @property
    def buffers(self) -> list[RemoteBuffer]:
        """The peer's registered buffers as last seen, lowest address first."""
        return list(self._bufs)

    def __repr__(self) -> str:
        d = self.descriptor
        return f"Segment({self.name!r}, endpoints={d.endpoints}, buffers={len(d.buffers)})"


def new_instance_id() -> str:
    return os.urandom(8).hex()
