"""The interface of a metadata backend: a key-value home for segment descriptors."""

from __future__ import annotations

from abc import ABC, abstractmethod

from ..errors import MetadataError
from ..segment import MAX_DESCRIPTOR_BYTES

#: Largest value a store client reads (and the HTTP metadata server keeps): the largest descriptor a
#: peer accepts, plus room for its seal.
MAX_VALUE = MAX_DESCRIPTOR_BYTES + (4 << 10)


class MetadataBackend(ABC):
    """Stores and finds segment descriptors by segment name."""

    #: True when the segment name must be the engine's own ``host:port`` (peer-to-peer mode).
    names_are_endpoints: bool = False
    #: True when published descriptors expire unless :meth:`keepalive` is called (etcd, Redis).
    leased: bool = False
    #: False when :meth:`publish` keeps nothing because the engine's own listener serves its descriptor (p2p):
    #: the engine then skips building one on every registration (quadratic in buffers registered one by one).
    keeps_descriptors: bool = True

    def seal(self, name: str, descriptor: bytes) -> bytes:
        """``descriptor`` (JSON) as the engine of ``name`` publishes and serves it: sealed with the cluster
        secret when one is set (see signed.py), else as it is."""
        return descriptor

    @abstractmethod
    def publish(self, name: str, descriptor: bytes) -> None:
        """Make ``descriptor`` (as :meth:`seal` made it) findable under ``name``, replacing any older one."""

    @abstractmethod
    def fetch(self, name: str) -> bytes | None:
        """The descriptor published under ``name`` (its seal checked, when there is a secret), or None if
        there is none."""

    @abstractmethod
    def remove(self, name: str) -> None:
        """Withdraw the descriptor of ``name`` (missing is not an error)."""

    def put_key(self, key: str, value: bytes) -> None:
        """Store ``value`` under the literal ``key`` (no prefix, no lease): keys other engines read (Mooncake's)."""
        raise MetadataError(f"metadata service {self} keeps no keys of other engines")

    def get_key(self, key: str) -> bytes | None:
        """The value under the literal ``key``, or None."""
        raise MetadataError(f"metadata service {self} keeps no keys of other engines")

    def delete_key(self, key: str) -> None:
        """Remove the literal ``key`` (missing is not an error)."""
        raise MetadataError(f"metadata service {self} keeps no keys of other engines")

    def keepalive(self) -> None:
        """Keep this engine's descriptor alive; re-publish it if the store lost it. Leased stores only."""

    def close(self) -> None:
        """Release connections."""

    def __str__(self) -> str:
        return type(self).__name__
