"""Entry point of the ``moonlet`` command."""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import MoonletError
from . import bench, info


def _metadata_server(args: argparse.Namespace) -> int:
    from ..metadata import MetadataServer

    srv = MetadataServer(args.host, args.port)
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
