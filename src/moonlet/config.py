"""One typed configuration object for an engine, and how the environment sets it.

All tunables live in :class:`EngineConfig`. ``EngineConfig(...)`` is exactly
what the code says: it never reads the environment, so tests and programs that
build one get the same object everywhere. :meth:`EngineConfig.from_env` (which
:class:`~moonlet.engine.TransferEngine` uses when no ``config=`` is passed)
also takes each field from ``MOONLET_<FIELD>`` (``MOONLET_LANES=4``): an
explicit argument wins over the environment, which wins over the default.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from numbers import Real
from typing import Any

from .errors import ConfigError

KiB = 1024
MiB = 1024 * KiB

#: The longest timeout moonlet takes, in seconds (about 11.6 days). Deadlines are monotonic-clock floats
#: that end up in socket options and poll() milliseconds; infinite, NaN or astronomically large values
#: would overflow those, so every timeout must be a finite number in (0, MAX_TIMEOUT].
MAX_TIMEOUT = 1e6


def check_timeout(name: str, value: object) -> float:
    """``value`` as a float number of seconds; :class:`ConfigError` naming ``name`` unless it is a real
    number, finite and in (0, :data:`MAX_TIMEOUT`] (NaN, infinity, zero, negatives and bools are refused)."""
    if isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value) \
            and 0 < float(value) <= MAX_TIMEOUT:
        return float(value)
    raise ConfigError(f"{name} must be a finite number of seconds in (0, {MAX_TIMEOUT:g}], got {value!r}")


@dataclass(frozen=True)
class EngineConfig:
    """Settings of one :class:`~moonlet.engine.TransferEngine`.

    Attributes:
        listen_host: address the engine's data/control listener binds to.
            Loopback by default so an engine never exposes memory by accident.
        advertise_host: address peers should dial; defaults to ``listen_host``
            (or the host name when listening on a wildcard address).
        port: TCP port of the listener; 0 picks a free one.
        lanes: parallel TCP connections kept per peer.
        slice_size: requests larger than this are cut into slices so that
            several lanes carry one request in parallel.
        frame_bytes: small requests bound for one peer are coalesced into one
            frame until it carries this many payload bytes. Each frame costs the
            target a fixed share of Python work, so larger frames serve more peers
            from one process: 4 MiB moved 1.5x-2.2x the bytes of 1 MiB with eight
            peers on a 16-CPU host (docs/performance.md, "Scale with peers").
            Same-host PULL/PUSH frames, whose payload never crosses the socket,
            have their own limit (64 MiB).
        frame_entries: ... or this many requests.
        request_timeout: default deadline of a request, in seconds. This and
            the three below, like every timeout argument of the engine, must be
            finite and in (0, :data:`MAX_TIMEOUT`] seconds.
        connect_timeout: deadline of a TCP connect + hello, in seconds.
        metadata_timeout: deadline of one metadata-service call, in seconds.
        metadata_ttl: lifetime of this engine's descriptor in etcd, Redis or the HTTP metadata server
            unless renewed (the engine renews it every third of it); a
            crashed engine disappears from the cluster within this time.
        socket_buffer: SO_SNDBUF/SO_RCVBUF size, None keeps the OS default.
        spin_us: after traffic, poll this long without sleeping before blocking.
            A sleep/wake-up pair costs tens to a hundred microseconds on
            virtual machines; spinning trades up to this much CPU time (one
            core, after each burst) for latency. 0 disables. The window adapts:
            it shrinks while spinning catches nothing, and no thread spins
            while the machine has as many runnable threads as CPUs.
        reactors: threads serving peers' connections on this engine's
            listener (each peer's connections are spread over them once they
            authenticate); 0: one per CPU this process may run on, at most 16.
        gpu_kernel_max_block: GPU-to-GPU batches whose blocks average at most
            this many bytes are moved by one gather-copy kernel (fast for small
            scattered blocks, but it borrows SMs); larger ones by the copy
            engines. 0 always uses the copy engines.
        rdma: whether the engine uses RDMA: "auto" where a usable NIC reaches
            the peer, else the next transport (the engine warns once, naming
            why RDMA is missing); "required" refuses to start without a usable
            NIC; "off" never uses it.
        rdma_devices: RDMA devices to use (e.g. ``("mlx5_0",)``); empty: every
            device with an active port.
        rdma_gid_index: GID index on every NIC; None picks one (RoCE v2 first).
        rdma_nic_matrix: NIC preference per memory location, as JSON text or a
            JSON file path: ``{"cuda:0": ["mlx5_0", "mlx5_1"]}``; None derives it
            from PCIe/NUMA distance.
        rdma_qps: queue pairs per (local NIC, peer NIC).
        rdma_queue_depth: work requests in flight per queue pair.
        rdma_mr_chunk: buffers larger than this are registered as several memory
            regions, pinned in parallel.
        rdma_register_threads: threads pinning memory regions at once.
        rdma_gpu: how GPU memory is registered with NICs: "auto", "dmabuf",
            "peermem" or "off".
        secret: the cluster secret (at least 16 bytes); every connection in both
            directions must prove it holds it. Never shown by repr or logs.
        secret_file: a file holding the secret, read when ``secret`` is None;
            with neither, ``$MOONLET_SECRET`` is used, and with no secret at all
            the engine serves anyone who reaches it (and says so in a warning,
            once per process). ``secret`` is the one field :meth:`from_env`
            does not read: ``$MOONLET_SECRET`` keeps its place last in that
            order, read when the engine starts.
        max_connections: connections the listener holds at once; more are refused.
        max_unauthenticated: of those, how many may not yet have proved the
            cluster secret (without a secret: not yet sent a valid frame); a
            newcomer past this quota closes the oldest of them, so silent or
            unauthenticated sockets never crowd out the peers that got through.
            Never more than ``max_connections``.
        idle_timeout: a connection with no traffic, no frame half received and
            no reply waiting this many seconds is closed (initiators reconnect
            when they next need it).
        tls_cert_file / tls_key_file / tls_ca_file: PEM files; with all three,
            every connection is TLS, and both ends must present a certificate
            signed by the CA (mutual TLS).
        transports: transport names in order of preference; empty means all
            installed ones, picked per request. ``cuda_ipc``, ``shm`` and
            ``rdma`` are skipped (with a warning) where this host lacks them.
        mooncake_wire: also speak Mooncake's wire, so Mooncake engines can
            open this engine's segment (handshake on the listener's port, data
            on a port of its own) and this engine can open theirs (transport
            ``mooncake_tcp``); with a metadata store, Mooncake's keys are
            written and read too.  Mooncake's wire has no authentication, so
            this cannot be combined with a cluster secret or TLS.
        metrics_port: serve Prometheus metrics at ``http://listen_host:PORT/metrics`` (0: any free port,
            see ``TransferEngine.metrics_url``); None (default): not served. Needs the ``metrics``
            extra (``pip install 'moonlet[metrics]'``); ``moonlet.metrics.register`` adds an engine's
            metrics to a registry the application serves itself.
    """

    listen_host: str = "127.0.0.1"
    advertise_host: str | None = None
    port: int = 0
    lanes: int = 2
    slice_size: int = 4 * MiB
    frame_bytes: int = 4 * MiB
    frame_entries: int = 256
    request_timeout: float = 30.0
    connect_timeout: float = 5.0
    metadata_timeout: float = 5.0
    metadata_ttl: float = 10.0
    socket_buffer: int | None = 4 * MiB
    spin_us: int = 1000
    reactors: int = 0
    gpu_kernel_max_block: int = 1 * MiB
    rdma: str = "auto"
    rdma_devices: tuple[str, ...] = field(default_factory=tuple)
    rdma_gid_index: int | None = None
    rdma_nic_matrix: str | None = None
    rdma_qps: int = 2
    rdma_queue_depth: int = 256
    rdma_mr_chunk: int = 1 << 30
    rdma_register_threads: int = 8
    rdma_gpu: str = "auto"
    secret: str | None = field(default=None, repr=False)
    secret_file: str | None = None
    max_connections: int = 1024
    max_unauthenticated: int = 64
    idle_timeout: float = 120.0
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_ca_file: str | None = None
    transports: tuple[str, ...] = field(default_factory=tuple)
    mooncake_wire: bool = False
    metrics_port: int | None = None

    @property
    def reactor_threads(self) -> int:
        """How many reactor threads serve peers: ``reactors``, or for 0 one per CPU this process may use, at
        most 16."""
        if self.reactors:
            return self.reactors
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = os.cpu_count() or 1
        return max(1, min(16, cpus))

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        if not 1 <= self.lanes <= 64:
            raise ConfigError(f"lanes must be in 1..64, got {self.lanes}")
        for name in ("slice_size", "frame_bytes"):
            if getattr(self, name) < 4 * KiB:
                raise ConfigError(f"{name} must be at least 4096 bytes, got {getattr(self, name)}")
        if not 1 <= self.frame_entries <= 4096:
            raise ConfigError(f"frame_entries must be in 1..4096, got {self.frame_entries}")
        for name in ("request_timeout", "connect_timeout", "metadata_timeout", "metadata_ttl"):
            object.__setattr__(self, name, check_timeout(name, getattr(self, name)))
        if self.socket_buffer is not None and self.socket_buffer < 64 * KiB:
            raise ConfigError(f"socket_buffer must be at least 65536 bytes, got {self.socket_buffer}")
        if not 0 <= self.spin_us <= 1_000_000:
            raise ConfigError(f"spin_us must be in 0..1000000, got {self.spin_us}")
        if not 0 <= self.reactors <= 256:
            raise ConfigError(f"reactors must be in 0..256 (0: one per CPU), got {self.reactors}")
        if not 1 <= self.rdma_qps <= 64:
            raise ConfigError(f"rdma_qps must be in 1..64, got {self.rdma_qps}")
        if not 16 <= self.rdma_queue_depth <= 16384:
            raise ConfigError(f"rdma_queue_depth must be in 16..16384, got {self.rdma_queue_depth}")
        if self.rdma_mr_chunk < 64 * KiB:
            raise ConfigError(f"rdma_mr_chunk must be at least 65536 bytes, got {self.rdma_mr_chunk}")
        if not 1 <= self.rdma_register_threads <= 256:
            raise ConfigError(f"rdma_register_threads must be in 1..256, got {self.rdma_register_threads}")
        if self.rdma_gpu not in ("auto", "dmabuf", "peermem", "off"):
            raise ConfigError(f"rdma_gpu must be 'auto', 'dmabuf', 'peermem' or 'off', got {self.rdma_gpu!r}")
        if self.rdma not in ("auto", "required", "off"):
            raise ConfigError(f"rdma must be 'auto', 'required' or 'off', got {self.rdma!r}")
        if self.rdma_gid_index is not None and not 0 <= self.rdma_gid_index < 256:
            raise ConfigError(f"rdma_gid_index must be in 0..255, got {self.rdma_gid_index}")
        if isinstance(self.rdma_devices, str):
            raise ConfigError("rdma_devices must be a sequence of names, e.g. ('mlx5_0',)")
        object.__setattr__(self, "rdma_devices", tuple(self.rdma_devices))
        if self.secret is not None and len(self.secret.encode()) < 16:
            raise ConfigError("secret must be at least 16 bytes long")
        if not 1 <= self.max_connections <= 1_000_000:
            raise ConfigError(f"max_connections must be in 1..1000000, got {self.max_connections}")
        if not 1 <= self.max_unauthenticated <= 1_000_000:
            raise ConfigError(f"max_unauthenticated must be in 1..1000000, got {self.max_unauthenticated}")
        object.__setattr__(self, "idle_timeout", check_timeout("idle_timeout", self.idle_timeout))
        tls = (self.tls_cert_file, self.tls_key_file, self.tls_ca_file)
        if any(tls) and not all(tls):
            raise ConfigError("TLS needs tls_cert_file, tls_key_file and tls_ca_file together")
        if self.mooncake_wire and (self.secret is not None or self.secret_file is not None or all(tls)):
            raise ConfigError("mooncake_wire cannot be combined with a cluster secret or TLS: Mooncake peers "
                              "can neither authenticate nor speak TLS")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port must be in 0..65535 (0: any free port), got {self.metrics_port}")
        if isinstance(self.transports, str):
            raise ConfigError("transports must be a sequence of names, e.g. ('tcp',)")
        object.__setattr__(self, "transports", tuple(self.transports))

    def with_(self, **changes: Any) -> EngineConfig:
        """Return a copy with ``changes`` applied (validated like the original)."""
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        return replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **explicit: Any) -> EngineConfig:
        """A config from ``explicit`` fields, then ``MOONLET_<FIELD>`` variables of ``environ`` (default
        ``os.environ``) for the others, then defaults. :class:`ConfigError` names the variable and its value
        when one cannot be parsed or is out of range (see :func:`resolve` for the syntax)."""
        return resolve(explicit, environ)[0]


#: Where a field's value came from: passed by the caller, a ``MOONLET_`` variable, or the default.
ARGUMENT, ENVIRONMENT, DEFAULT = "argument", "environment", "default"

#: Fields :meth:`EngineConfig.from_env` does not read (``$MOONLET_SECRET`` is read by the engine itself,
#: after ``secret`` and ``secret_file``, so that its meaning stays what it was).
NOT_FROM_ENV = frozenset({"secret"})

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


#: MOONLET_ variables moonlet reads besides the fields' own, and prefixes of its test harness's (tests/lab.sh).
OTHER_VARIABLES = frozenset({"MOONLET_SECRET"})
_HARNESS = ("MOONLET_LAB", "MOONLET_RDMA_LAB", "MOONLET_FUZZ", "MOONLET_MOONCAKE_PYTHON")
_misspelled_warned: set[str] = set()  # variables already warned about, once per process


def _warn_misspelled(environ: Mapping[str, str], names: list[str]) -> None:
    """Warn (once per process and variable) about a MOONLET_ variable that is no setting but close to one:
    a typo would otherwise leave the default in force without a word."""
    known = {env_name(n) for n in names} | OTHER_VARIABLES
    for var in environ:
        if var.startswith("MOONLET_") and var not in known and var not in _misspelled_warned \
                and not var.startswith(_HARNESS):
            close = difflib.get_close_matches(var, sorted(known), n=1, cutoff=0.8)
            if close:
                _misspelled_warned.add(var)
                logging.getLogger("moonlet").warning("%s is not a moonlet setting and is ignored; did you mean %s?",
                                                     var, close[0])


def env_name(field_name: str) -> str:
    """The environment variable of an :class:`EngineConfig` field: ``lanes`` -> ``MOONLET_LANES``."""
    return "MOONLET_" + field_name.upper()


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError("not a boolean (use 1/0, true/false, yes/no)")


def _parse_int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError("not an integer") from None


def _parse_float(text: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise ValueError("not a number") from None


def _parse_names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _parser(hint: Any) -> tuple[Callable[[str], Any], bool]:
    """The text parser of a field's type, and whether an empty string means None."""
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    if typing.get_origin(base) is tuple:
        return _parse_names, optional
    parse: dict[Any, Callable[[str], Any]] = {bool: _parse_bool, int: _parse_int, float: _parse_float, str: str}
    return parse[base], optional


_HINTS = typing.get_type_hints(EngineConfig)
_PARSERS = {f.name: _parser(_HINTS[f.name]) for f in fields(EngineConfig)}


def resolve(explicit: Mapping[str, Any] | None = None,
            environ: Mapping[str, str] | None = None) -> tuple[EngineConfig, dict[str, str]]:
    """The config :meth:`EngineConfig.from_env` builds, and where each field came from
    (:data:`ARGUMENT`, :data:`ENVIRONMENT` or :data:`DEFAULT`).

    A variable's text is parsed by the field's type: integers and floats as Python writes them, booleans as
    1/0, true/false, yes/no (or on/off), tuples of names comma-separated (``MOONLET_TRANSPORTS=shm,tcp``;
    empty: none), and an empty string is None for fields that may be None (``MOONLET_SOCKET_BUFFER=``).
    """
    explicit = dict(explicit or {})
    environ = os.environ if environ is None else environ
    names = [f.name for f in fields(EngineConfig)]
    _warn_misspelled(environ, names)
    unknown = set(explicit) - set(names)
    if unknown:
        raise ConfigError(f"unknown config field(s): {', '.join(sorted(unknown))}")
    values: dict[str, Any] = dict(explicit)
    sources = {name: ARGUMENT if name in explicit else DEFAULT for name in names}  # in field order
    from_env: dict[str, str] = {}  # field -> its variable's text
    for name in names:
        if name in explicit or name in NOT_FROM_ENV:
            continue
        text = environ.get(env_name(name))
        if text is None:
            continue
        parse, optional = _PARSERS[name]
        try:
            values[name] = None if optional and not text.strip() else parse(text)
        except ValueError as e:
            raise ConfigError(f"{env_name(name)}={text!r}: {e}") from None
        sources[name] = ENVIRONMENT
        from_env[name] = text
    try:
        cfg = EngineConfig(**values)
    except ConfigError as e:
        # Name the variables the complaint is about (every field check names its field), else all of them.
        named = [n for n in from_env if re.search(rf"\b{n}\b", str(e))] or sorted(from_env)
        if not named:
            raise
        where = ", ".join(f"{env_name(n)}={from_env[n]!r}" for n in sorted(named))
        raise ConfigError(f"{where}: {e}") from None
    return cfg, sources
