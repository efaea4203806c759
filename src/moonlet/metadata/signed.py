"""Descriptors sealed with the cluster secret, so a metadata store cannot send peers to an impostor.

A segment descriptor says where its engine listens.  Whoever can write to
the metadata store (anyone who reaches an HTTP metadata server, any client
of a shared etcd or Redis) could otherwise point a segment's name at a
listener of its own.  So with a cluster secret set, every engine seals the
descriptor it publishes, and the one it serves peer to peer, with an
HMAC-SHA256 under the secret (its own label, so it is never valid as an
authentication proof), covering the segment name and the exact descriptor
bytes; and it refuses, before parsing, any descriptor whose seal is missing
or wrong.  Every backend is wrapped the same way (:func:`metadata.connect`),
peer to peer included: a descriptor fetched over an authenticated connection
is sealed too, so one rule holds everywhere.

What a seal does not stop: a store writer can delete descriptors, or put
back one the same engine published earlier.  An old descriptor gains it
nothing: the connection handshake proves the peer is the engine that
advertises the endpoint dialed (``security/auth.py``), and the engine
checks the instance it reaches and owns the rights to its memory.

Without a secret nothing is sealed or checked, and whoever can write to the
store decides where peers connect.  That is the threat model of engines
without a secret (any process that reaches one can read and write its
registered memory anyway); set ``MOONLET_SECRET`` where the store or the
network is shared.  Mooncake's wire (``mooncake_wire``) cannot be combined
with a secret, so a store it writes is never sealed.

Format: the descriptor's JSON object with one more member at its end,
``,"hmac":"<64 hex digits>"}``, so a sealed descriptor is still a descriptor
that any reader parses (an engine without the secret, ``curl``); the HMAC
covers the bytes without that member.
"""

from __future__ import annotations

import hmac
import re

from ..errors import SegmentError
from ..security import Secret
from .base import MetadataBackend

_LABEL = b"moonlet-descriptor-1"
_SEAL = re.compile(rb',"hmac":"([0-9a-f]{64})"}\Z')
_SEAL_SIZE = len(b',"hmac":""}') + 64


def seal(secret: Secret, name: str, descriptor: bytes) -> bytes:
    """``descriptor`` (a JSON object, compact) with its seal for segment ``name`` appended."""
    if not (descriptor.startswith(b"{") and descriptor.endswith(b"}") and len(descriptor) > 2):
        raise ValueError("only a non-empty JSON object can be sealed")
    mac = secret.mac(_LABEL, name.encode("utf-8", "surrogateescape"), descriptor).hex()
    return descriptor[:-1] + b',"hmac":"' + mac.encode() + b'"}'


def unseal(secret: Secret, name: str, sealed: bytes, where: str) -> bytes:
    """The descriptor of ``name`` that ``sealed`` holds, once its seal checks out; SegmentError if it does not.

    ``where``: the metadata service it came from, for the error message.
    """
    m = _SEAL.search(sealed[-_SEAL_SIZE:])
    if m is None:
        raise SegmentError(f"descriptor of segment {name!r} from {where} is not signed with the cluster secret: "
                           "refused (written by an engine without this secret, or by someone else; every engine "
                           "of the cluster must set the same MOONLET_SECRET)")
    descriptor = sealed[:-_SEAL_SIZE] + b"}"
    expected = secret.mac(_LABEL, name.encode("utf-8", "surrogateescape"), descriptor).hex().encode()
    if not hmac.compare_digest(m.group(1), expected):
        raise SegmentError(f"descriptor of segment {name!r} from {where} has a wrong signature: refused (forged or "
                           "altered in the store, or signed with another cluster secret)")
    return descriptor


class SignedMetadata(MetadataBackend):
    """``inner``, with descriptors sealed by :meth:`seal` and checked by :meth:`fetch` (see the module docstring)."""

    def __init__(self, inner: MetadataBackend, secret: Secret) -> None:
        self._inner = inner
        self._secret = secret
        self.names_are_endpoints = inner.names_are_endpoints
        self.leased = inner.leased
        self.keeps_descriptors = inner.keeps_descriptors

    def seal(self, name: str, descriptor: bytes) -> bytes:
        return seal(self._secret, name, descriptor)

    def publish(self, name: str, descriptor: bytes) -> None:
        self._inner.publish(name, descriptor)

    def fetch(self, name: str) -> bytes | None:
        sealed = self._inner.fetch(name)
        return None if sealed is None else unseal(self._secret, name, sealed, str(self._inner))

    def remove(self, name: str) -> None:
        self._inner.remove(name)

    def keepalive(self) -> None:
        self._inner.keepalive()

    def close(self) -> None:
        self._inner.close()

    def __str__(self) -> str:
        return str(self._inner)
