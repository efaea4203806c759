"""Entry point of the ``moonlet`` command."""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import MoonletError
from ..metadata.base import MAX_VALUE
from ..metadata.http import MAX_CLIENTS, MAX_TOTAL, REQUEST_TIMEOUT, MetadataServer
from . import bench, info


def _metadata_server(args: argparse.Namespace) -> int:
    srv = MetadataServer(args.host, args.port, max_value=args.max_value, max_total=args.max_total_mib << 20,
                         max_clients=args.max_clients, timeout=args.timeout)
    print(f"moonlet metadata server on {srv.url}", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moonlet", description="moonlet transfer engine tools")
    p.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="measure transfers between two engines (default: two processes on loopback)")
    bench.add_arguments(b)
    b.set_defaults(func=bench.main)
    i = sub.add_parser("info", help="show GPUs, NICs, NUMA and which transports work here")
    i.set_defaults(func=info.main)
    m = sub.add_parser("metadata-server", help="run an HTTP metadata server (Mooncake's REST shape)")
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
    m.set_defaults(func=_metadata_server)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return args.func(args)
    except MoonletError as e:
        print(f"moonlet: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
