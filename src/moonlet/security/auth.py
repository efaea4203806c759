"""Mutual challenge-response authentication of a connection with the cluster secret, sans-IO.

The three messages are bodies: the transport that carries them frames them (moonlet's TCP carries
each in an AUTH control frame).

Both ends prove they hold the secret without sending it.  Each proof is an
HMAC-SHA256 over both ends' fresh random nonces, so a recorded proof is
worthless on any later connection (no replay); the two directions use
different labels, so a proof cannot be reflected back to its sender; and both
proofs cover the identity of the target the initiator meant -- the TCP
endpoint it dialed, which the target knows as its own advertised endpoint --
so a proof relayed to another engine fails::

    initiator -> AUTH  opening = nonce_i [| SHA-256(segment name)]                (32 or 64 bytes)
    target    -> AUTH  nonce_t | HMAC(secret, "target" | opening | nonce_t | endpoint)    (64 bytes)
    initiator -> AUTH  HMAC(secret, "initiator" | opening | nonce_t | endpoint)           (32 bytes)

(each part of an HMAC's input is length-prefixed).  The opening carries the
hash of the segment name the initiator means when it knows it; a target
with another name refuses the connection, saying so.

Why the endpoint: a process that can rewrite a descriptor in a metadata
store (or otherwise make an initiator dial it) could relay these three
messages between an honest initiator and the real target, and keep the
authenticated connection for itself.  Now the target's proof covers its own
endpoint, not the relay's, so the initiator refuses it, and the initiator's
proof covers the relay's endpoint, so the target would refuse it too.  The
price: an initiator must dial a target by the exact ``host:port`` the target
advertises (``TcpTransport.endpoint()``: what descriptors carry, and what a
segment name is in peer-to-peer mode); an alias such as ``localhost:PORT``
for an engine advertising ``127.0.0.1:PORT`` fails to authenticate -- as it
already failed the check that a descriptor names the segment asked for.

With TLS (mutual certificates of the cluster CA) a relay without a
certificate gets nowhere even before this: it can only pass the encrypted
bytes of the honest ends' own session, and can read or inject none.

The target serves nothing on a connection before the last message checks
out; the initiator sends nothing else before the target has proved itself.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping

from ..errors import ProtocolError
from .secret import Secret

NONCE = 32
MAC = 32
_TARGET = b"moonlet-auth-2 target"
_INITIATOR = b"moonlet-auth-2 initiator"


def _name_hash(name: str) -> bytes:
    return hashlib.sha256(name.encode("utf-8", "surrogateescape")).digest()


class InitiatorAuth:
    """The initiator's side: :meth:`start`, then :meth:`finish` with the target's answer.

    ``endpoint``: the ``host:port`` dialed, exactly as the target advertises
    it; ``name``: the segment name of the target meant, when known.
    """

    def __init__(self, secret: Secret, endpoint: str, name: str | None = None) -> None:
        self._secret = secret
        self._endpoint = endpoint
        self._opening = os.urandom(NONCE) + (_name_hash(name) if name else b"")

    def start(self) -> bytes:
        """The first message."""
        return self._opening

    def finish(self, body: bytes) -> bytes:
        """Check the target's proof; returns our proof (the last message)."""
        if len(body) != NONCE + MAC:
            raise ProtocolError(f"AUTH answer of {len(body)} bytes, expected {NONCE + MAC}")
        nonce_t, proof = body[:NONCE], body[NONCE:]
        endpoint = self._endpoint.encode()
        if not hmac.compare_digest(proof, self._secret.mac(_TARGET, self._opening, nonce_t, endpoint)):
            raise ProtocolError(
                f"the peer at {self._endpoint} failed to prove it holds the cluster secret as the engine that "
                "advertises that endpoint: it has another secret, or it relays another engine's handshake, or "
                "the engine there advertises another host:port (dial it, or open its segment, by the name it "
                "reports)")
        return self._secret.mac(_INITIATOR, self._opening, nonce_t, endpoint)


class TargetAuth:
    """The target's side: :meth:`challenge` on the first message (returns the answer), :meth:`verify` on the last.

    ``identity``: this engine's ``"endpoint"`` (the ``host:port`` it
    advertises) and ``"name"`` (its segment name).
    """

    def __init__(self, secret: Secret, identity: Mapping[str, str]) -> None:
        self._secret = secret
        self._endpoint = identity["endpoint"]
        self._name = identity["name"]
        self._nonce = os.urandom(NONCE)
        self._theirs: bytes | None = None

    def challenge(self, body: bytes) -> bytes:
        if len(body) not in (NONCE, NONCE + 32):
            raise ProtocolError(f"AUTH opening of {len(body)} bytes, expected {NONCE} or {NONCE + 32}")
        if len(body) > NONCE and not hmac.compare_digest(body[NONCE:], _name_hash(self._name)):
            raise ProtocolError(f"this is engine {self._name!r} at {self._endpoint}; the connection was meant for "
                                "another segment (a stale or forged descriptor?)")
        self._theirs = body
        return self._nonce + self._secret.mac(_TARGET, body, self._nonce, self._endpoint.encode())

    @property
    def started(self) -> bool:
        return self._theirs is not None

    def verify(self, body: bytes) -> None:
        assert self._theirs is not None
        if len(body) != MAC or not hmac.compare_digest(
                body, self._secret.mac(_INITIATOR, self._theirs, self._nonce, self._endpoint.encode())):
            raise ProtocolError(f"authentication failed: the peer does not hold this cluster's secret, or it "
                                f"authenticated to another endpoint than this engine's {self._endpoint} (a relay)")
