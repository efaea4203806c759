"""Entry point of the ``moonlet`` command."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from importlib import metadata as importlib_metadata

from .. import __version__
from ..errors import MoonletError
from ..metadata.base import MAX_VALUE
from ..metadata.http import MAX_CLIENTS, MAX_TOTAL, REQUEST_TIMEOUT, MetadataServer
from . import bench, info

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def version() -> str:
    """The installed distribution's version (importlib.metadata), else the package's own ``__version__``."""
    try:
        return importlib_metadata.version("moonlet")
    except importlib_metadata.PackageNotFoundError:
        return __version__


def _metadata_server(args: argparse.Namespace) -> int:
    srv = MetadataServer(args.host, args.port, max_value=args.max_value, max_total=args.max_total_mib << 20,
                         max_clients=args.max_clients, timeout=args.timeout, persist=args.persist)
    # The server runs in its own thread and the main thread only waits for SIGINT or SIGTERM, so a signal never
    # lands inside a request or a write of the persist file: stop() then writes the store whole.
    done = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: done.set())
    srv.start()
    print(f"moonlet metadata server on {srv.url}", flush=True)
    try:
        done.wait()
    finally:
        srv.stop()
    return 0


def _logging_options() -> argparse.ArgumentParser:
    """``-v`` and ``--log-level``, accepted before and after the subcommand (``moonlet bench -v``)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                   help="log what moonlet does: -v info, -vv debug (to stderr)")
    p.add_argument("--log-level", choices=LOG_LEVELS, default=argparse.SUPPRESS,
                   help="level of the moonlet loggers (default warning; overrides -v)")
    return p


def log_level(args: argparse.Namespace) -> int:
    """The level ``-v``/``--log-level`` ask for (WARNING without either)."""
    name = getattr(args, "log_level", None)
    if name:
        return int(getattr(logging, name.upper()))
    verbose = getattr(args, "verbose", 0)
    return logging.DEBUG if verbose >= 2 else logging.INFO if verbose == 1 else logging.WARNING


def setup_logging(level: int) -> None:
    """Send the ``moonlet`` loggers' records at ``level`` and above to stderr, through a handler of their own
    (other libraries' loggers and the root logger keep their settings)."""
    logger = logging.getLogger("moonlet")
    logger.setLevel(level)
    if not any(getattr(h, "moonlet_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler.moonlet_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)


def build_parser() -> argparse.ArgumentParser:
    common = _logging_options()
    p = argparse.ArgumentParser(prog="moonlet", description="moonlet transfer engine tools", parents=[common])
    p.add_argument("--version", action="version", version=f"moonlet {version()}")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", parents=[common],
                       help="measure transfers between two engines (default: two processes on loopback)",
                       description="Measure transfers between two engines. Each side's memory is written once "
                                   "(pre-touched) before any row is timed, so rows measure transfers, not page "
                                   "faults. EngineConfig fields not set by a flag come from MOONLET_<FIELD> "
                                   "variables (see moonlet info).")
    bench.add_arguments(b)
    b.set_defaults(func=bench.main)
    i = sub.add_parser("info", parents=[common],
                       help="show GPUs, NICs, NUMA, which transports work here and the effective configuration")
    i.set_defaults(func=info.main)
    m = sub.add_parser("metadata-server", parents=[common], help="run an HTTP metadata server (Mooncake's REST shape)",
                       description="Run an HTTP metadata server (Mooncake's REST shape). moonlet engines PUT their "
                                   "descriptor with a TTL (metadata_ttl) and renew it, so a crashed engine's "
                                   "entry expires; other keys never expire.")
    m.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    m.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    m.add_argument("--max-value", type=int, default=MAX_VALUE, metavar="BYTES",
                   help=f"largest value kept (default {MAX_VALUE}: the largest descriptor peers accept, sealed)")
    m.add_argument("--max-total-mib", type=int, default=MAX_TOTAL >> 20, metavar="MIB",
                   help=f"all keys and values together, in MiB (default {MAX_TOTAL >> 20})")
    m.add_argument("--max-clients", type=int, default=MAX_CLIENTS,
                   help=f"connections served at once; more are refused (default {MAX_CLIENTS})")
    m.add_argument("--timeout", type=float, default=REQUEST_TIMEOUT,
                   help=f"seconds one request may take before it is dropped (default {REQUEST_TIMEOUT:g})")
    m.add_argument("--persist", metavar="FILE",
                   help="keep the store in FILE (written at most once a second and on exit, read at start; "
                        "entries keep their expiry). No replication: use etcd for metadata that must outlive "
                        "a host")
    m.set_defaults(func=_metadata_server)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.log_level_value = log_level(args)
    setup_logging(args.log_level_value)
    try:
        return int(args.func(args))
    except (MoonletError, OSError) as e:  # bad input or a host that lacks something: one line, no traceback
        print(f"moonlet: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
