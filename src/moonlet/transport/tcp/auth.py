"""Mutual challenge-response authentication of a connection with the cluster secret, sans-IO.

Both ends prove they hold the secret without sending it.  Each proof is an
HMAC-SHA256 over both ends' fresh random nonces, so a recorded proof is
worthless on any later connection (no replay), and the two directions use
different labels, so a proof cannot be reflected back to its sender::

    initiator -> AUTH  nonce_i                                   (32 bytes)
    target    -> AUTH  nonce_t | HMAC(secret, "target" | nonce_i | nonce_t)     (64 bytes)
    initiator -> AUTH  HMAC(secret, "initiator" | nonce_i | nonce_t)            (32 bytes)

The target serves nothing on a connection before the last message checks
out; the initiator sends nothing else before the target has proved itself.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from ...errors import ConfigError, ProtocolError
from . import protocol as P

NONCE = 32
MAC = 32


class Secret:
    """The cluster secret. Its repr never shows it, so it cannot end up in a log or a traceback."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ConfigError("the cluster secret must be at least 16 bytes long")
        self._key = key

    def mac(self, label: bytes, nonce_i: bytes, nonce_t: bytes) -> bytes:
        return hmac.new(self._key, label + nonce_i + nonce_t, hashlib.sha256).digest()

    def __repr__(self) -> str:
        return "Secret(<hidden>)"


def load_secret(value: str | None, path: str | None) -> Secret | None:
    """The secret from ``value``, else the file at ``path``, else ``$MOONLET_SECRET``; None when none is set."""
    if value:
        return Secret(value.encode())
    if path:
        try:
            with open(path, "rb") as f:
                return Secret(f.read().strip())
        except OSError as e:
            raise ConfigError(f"cannot read the cluster secret file {path!r}: {e.strerror}") from None
    env = os.environ.get("MOONLET_SECRET")
    return Secret(env.encode()) if env else None


def _frame(body: bytes) -> bytes:
    return P.encode_control(P.AUTH, body)


class InitiatorAuth:
    """The initiator's side: :meth:`start`, then :meth:`finish` with the target's answer."""

    def __init__(self, secret: Secret) -> None:
        self._secret = secret
        self._nonce = os.urandom(NONCE)

    def start(self) -> bytes:
        """The first AUTH frame."""
        return _frame(self._nonce)

    def finish(self, body: bytes) -> bytes:
        """Check the target's proof; returns our proof (the last AUTH frame)."""
        if len(body) != NONCE + MAC:
            raise ProtocolError(f"AUTH answer of {len(body)} bytes, expected {NONCE + MAC}")
        nonce_t, proof = body[:NONCE], body[NONCE:]
        if not hmac.compare_digest(proof, self._secret.mac(b"target", self._nonce, nonce_t)):
            raise ProtocolError("the peer failed to prove it holds the cluster secret")
        return _frame(self._secret.mac(b"initiator", self._nonce, nonce_t))


class TargetAuth:
    """The target's side: :meth:`challenge` on the first AUTH frame, :meth:`verify` on the second."""

    def __init__(self, secret: Secret) -> None:
        self._secret = secret
        self._nonce = os.urandom(NONCE)
        self._theirs: bytes | None = None

    def challenge(self, body: bytes) -> bytes:
        if len(body) != NONCE:
            raise ProtocolError(f"AUTH opening of {len(body)} bytes, expected {NONCE}")
        self._theirs = body
        return _frame(self._nonce + self._secret.mac(b"target", body, self._nonce))

    @property
    def started(self) -> bool:
        return self._theirs is not None

    def verify(self, body: bytes) -> None:
        assert self._theirs is not None
        if len(body) != MAC or not hmac.compare_digest(body, self._secret.mac(b"initiator", self._theirs,
                                                                              self._nonce)):
            raise ProtocolError("authentication failed: the peer does not hold this cluster's secret")
