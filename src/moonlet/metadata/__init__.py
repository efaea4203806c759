"""Metadata backends, one per module, chosen by the ``metadata=`` string of an engine."""

from __future__ import annotations

from ..errors import ConfigError
from .base import MetadataBackend
from .http import HttpMetadata, MetadataServer
from .p2p import P2PMetadata


def connect(spec: str, timeout: float) -> MetadataBackend:
    """Backend for ``spec``: ``"p2p"`` or ``"http://host:port[/metadata]"``."""
    if spec.lower() in ("p2p", "p2phandshake"):
        return P2PMetadata(timeout)
    if spec.startswith("http://"):
        return HttpMetadata(spec, timeout)
    raise ConfigError(f"unknown metadata service {spec!r}; use 'p2p' or 'http://host:port'")


__all__ = ["MetadataBackend", "HttpMetadata", "MetadataServer", "P2PMetadata", "connect"]
