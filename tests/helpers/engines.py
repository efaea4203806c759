"""Factories of initiator engines, so each test says only what differs from the usual one."""

from __future__ import annotations

from typing import Any

from moonlet import EngineConfig, TransferEngine


def initiator(name: str | None = None, metadata: str = "p2p", *, transports: tuple[str, ...] = ("tcp",),
              request_timeout: float = 5.0, **config: Any) -> TransferEngine:
    """An engine (not yet entered: use it in ``with``) that moves bytes over ``transports`` only -- TCP by
    default, the path towards another host -- with every request bounded by ``request_timeout`` seconds and
    the other ``config`` fields as given."""
    return TransferEngine(name, metadata, config=EngineConfig(transports=transports, request_timeout=request_timeout,
                                                              **config))


def transport(engine: TransferEngine, name: str) -> Any:
    """The running transport ``name`` of ``engine`` (to reach into its server in tests of what peers see)."""
    return next(t for t in engine._all_transports if t.name == name)
