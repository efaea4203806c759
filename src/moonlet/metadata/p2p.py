"""Peer-to-peer metadata: no server; descriptors are fetched from the peer itself.

A segment's name is the ``host:port`` of its engine's listener, which answers
GET_DESC frames with its current descriptor, so a peer that registers more
memory is seen as soon as it is asked again.
"""

from __future__ import annotations

from ..errors import MetadataError, ProtocolError, SegmentError
from ..security import PLAIN, Security
from ..transport.tcp.client import fetch_descriptor
from .base import MetadataBackend


class P2PMetadata(MetadataBackend):
    names_are_endpoints = True
    keeps_descriptors = False

    def __init__(self, timeout: float, security: Security = PLAIN) -> None:
        self._timeout = timeout
        self._security = security

    def publish(self, name: str, descriptor: bytes) -> None:
        """Nothing to do: the engine's own listener serves its descriptor."""

    def fetch(self, name: str) -> bytes | None:
        try:
            return fetch_descriptor(name, self._timeout, self._security)
        except SegmentError:
            raise SegmentError(
                f"segment name {name!r} is not host:port; in p2p mode open a segment by its engine's host:port"
            ) from None
        except TimeoutError:
            raise MetadataError(f"cannot fetch the descriptor of {name!r} from the peer itself: it did not answer "
                                f"within {self._timeout:g} s (is a moonlet engine listening there?)") from None
        except (OSError, ProtocolError) as e:
            raise MetadataError(f"cannot fetch the descriptor of {name!r} from the peer itself: {e}") from None

    def remove(self, name: str) -> None:
        """Nothing to do: the descriptor disappears with the engine's listener."""

    def __str__(self) -> str:
        return "p2p"
