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
import socket
import threading
from dataclasses import dataclass, field

from .errors import SegmentError

DESCRIPTOR_VERSION = 1
#: Optional per-buffer keys telling peers how to reach a buffer directly:
#: memfd (same-host mapping), gpu (UUID), ipc and ipc_base (CUDA IPC handle of the allocation),
#: rkeys (RDMA remote key per NIC name, best NIC first).
SHARE_KEYS = ("memfd", "gpu", "ipc", "ipc_base", "rkeys")


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
    buffers: list[dict] = field(default_factory=list)
    pidns: str = ""  # PID namespace: same-host copies need the same one
    generation: int = 0  # bumped by every unregister
    control: dict | None = None  # {"memfd", "addr"}: a page whose first word is the live generation
    nics: list[dict] = field(default_factory=list)  # RDMA NICs: name, port, gid, lid, mtu, numa

    @property
    def transports(self) -> list[str]:
        return sorted(self.endpoints)

    def to_dict(self) -> dict:
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
    def from_json(cls, data: bytes | str | dict) -> "SegmentDescriptor":
        """Parse and validate a descriptor; raise :class:`SegmentError` on anything malformed."""
        try:
            d = json.loads(data) if isinstance(data, (bytes, str)) else data
            if d.get("version") != DESCRIPTOR_VERSION:
                raise SegmentError(f"unsupported segment descriptor version {d.get('version')!r}")
            bufs = [
                {
                    "addr": int(b["addr"]),
                    "length": int(b["length"]),
                    "location": str(b["location"]),
                    "remote_read": bool(b.get("remote_read", True)),
                    "remote_write": bool(b.get("remote_write", True)),
                    **{k: b[k] for k in SHARE_KEYS if k in b},
                }
                for b in d["buffers"]
            ]
            for b in bufs:
                if "rkeys" in b:
                    b["rkeys"] = {str(nic): [int(k) for k in (keys if isinstance(keys, list) else [keys])]
                                  for nic, keys in dict(b["rkeys"]).items()}
            return cls(
                name=str(d["name"]),
                instance=str(d["instance"]),
                host=str(d["host"]),
                pid=int(d["pid"]),
                endpoints={str(k): str(v) for k, v in dict(d["endpoints"]).items()},
                buffers=bufs,
                pidns=str(d.get("pidns", "")),
                generation=int(d.get("generation", 0)),
                control={"memfd": int(d["control"]["memfd"]), "addr": int(d["control"]["addr"])}
                if d.get("control") else None,
                nics=[{"name": str(n["name"]), "port": int(n["port"]), "gid": str(n["gid"]), "lid": int(n["lid"]),
                       "mtu": int(n["mtu"]), "numa": int(n.get("numa", -1))} for n in d.get("nics", [])],
            )
        except SegmentError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise SegmentError(f"malformed segment descriptor: {e!r}") from None


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
        self.watch = None
        self.update(descriptor)

    def stale(self) -> bool:
        """Whether the peer unregistered memory since this descriptor was fetched (same host only)."""
        watch = self.watch
        return watch is not None and watch.word() != self.descriptor.generation

    def update(self, descriptor: SegmentDescriptor) -> None:
        with self._lock:
            self.descriptor = descriptor
            # Private keys let the engine test "still inside the last buffer hit" without a lookup.
            bufs = sorted(({**b, "_seg": self, "_end": b["addr"] + b["length"]} for b in descriptor.buffers),
                          key=lambda b: b["addr"])
            self._starts = [b["addr"] for b in bufs]
            self._bufs = bufs
            self._last: dict | None = None  # the last buffer find() returned

    def find(self, addr: int, length: int) -> dict | None:
        """The cached remote buffer holding ``[addr, addr+length)``, or None."""
        b = self._last  # requests mostly hit the buffer the previous one did
        if b is not None and b["addr"] <= addr and addr + length <= b["_end"]:
            return b
        with self._lock:
            i = bisect.bisect_right(self._starts, addr) - 1
            if i < 0:
                return None
            b = self._bufs[i]
            if addr + length > b["_end"]:
                return None
            self._last = b
            return b

    @property
    def buffers(self) -> list[dict]:
        """The peer's registered buffers as last seen (addr, length, location, rights)."""
        return list(self.descriptor.buffers)

    def __repr__(self) -> str:
        d = self.descriptor
        return f"Segment({self.name!r}, endpoints={d.endpoints}, buffers={len(d.buffers)})"


def new_instance_id() -> str:
    return os.urandom(8).hex()
