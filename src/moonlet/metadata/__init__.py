"""Metadata backends, one per module, chosen by the ``metadata=`` string of an engine."""

from __future__ import annotations

from ..errors import ConfigError
from ..security import PLAIN, Security
from .base import MetadataBackend
from .etcd import EtcdMetadata
from .http import HttpMetadata, MetadataServer
from .p2p import P2PMetadata
from .redis import RedisMetadata
from .signed import SignedMetadata


def connect(spec: str, timeout: float, ttl: float, security: Security = PLAIN) -> MetadataBackend:
    """Backend for ``spec``: ``"p2p"``, ``"http://host:port[/metadata]"``, ``"etcd://host:port[,...][/cluster]"``
    or ``"redis://[user:pass@]host:port[/db][?cluster=ID]"``; ``ttl`` is the lease of HTTP, etcd and Redis entries.
    ``security`` (TLS, cluster secret) applies to peer-to-peer descriptor fetches; with a cluster secret,
    every backend seals the descriptors it publishes and refuses those not sealed with it (signed.py)."""
    backend = _backend(spec, timeout, ttl, security)
    return backend if security.secret is None else SignedMetadata(backend, security.secret)


def _backend(spec: str, timeout: float, ttl: float, security: Security) -> MetadataBackend:
    if spec.lower() in ("p2p", "p2phandshake"):
        return P2PMetadata(timeout, security)
    if spec.startswith("http://"):
        return HttpMetadata(spec, timeout, ttl)
    if spec.startswith("etcd://"):
        return EtcdMetadata(spec, timeout, ttl)
    if spec.startswith(("redis://", "rediss://")):
        return RedisMetadata(spec, timeout, ttl)
    raise ConfigError(f"unknown metadata service {spec!r}; use 'p2p', 'http://host:port', 'etcd://host:port' "
                      "or 'redis://host:port'")


__all__ = ["MetadataBackend", "EtcdMetadata", "HttpMetadata", "MetadataServer", "P2PMetadata", "RedisMetadata",
           "SignedMetadata", "connect"]
