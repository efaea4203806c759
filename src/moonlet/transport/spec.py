"""What a transport declares about itself to the registry: its name, whether it can run here, how it starts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..config import EngineConfig
from .base import HostContext, Transport

#: "auto", "required" or "off" (EngineConfig checks the values it takes, e.g. ``rdma``)
Policy = str


def _runs_anywhere(cfg: EngineConfig) -> str:
    return ""


def _auto(cfg: EngineConfig) -> Policy:
    return "auto"


@dataclass(frozen=True)
class TransportSpec:
    """One transport as the engine knows it: everything else it learns through :class:`Transport`.

    ``start(ctx)`` makes the transport (it may raise OSError or MoonletError: the engine then goes on without
    it, unless its policy is "required"). ``missing(cfg)``: why this host cannot run it, '' when it can.
    ``policy(cfg)``: "off" leaves it out, "required" refuses to start an engine without it, "auto" uses it
    where it can run. ``listener``: the engine's address and control dispatcher, started first in every
    engine. ``announce``: in the default order even where it cannot run, so that its absence is said (one
    warning), not silent. ``extra(cfg)``: not in the default order; appended to it when this says so.
    """

    name: str
    start: Callable[[HostContext], Transport]
    missing: Callable[[EngineConfig], str] = _runs_anywhere
    policy: Callable[[EngineConfig], Policy] = _auto
    listener: bool = False
    announce: bool = False
    extra: Callable[[EngineConfig], bool] | None = None
