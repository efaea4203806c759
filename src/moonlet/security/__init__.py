"""What every connection must pass before any traffic: TLS (optional), then proof of the cluster secret.

One module every layer may import (metadata stores seal descriptors with the
secret, transports dial and serve with both): ``secret.py`` (the secret and
its MACs), ``auth.py`` (the challenge-response proof, sans-IO), ``tls.py``
(mutual TLS through a relay thread), and :class:`Security`, the pair an
engine hands to each of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import EngineConfig
from .secret import Secret, load_secret
from .tls import Tls


@dataclass(frozen=True)
class Security:
    """What each connection must do before any traffic: TLS (optional), then prove the secret (if set)."""

    secret: Secret | None = None
    tls: Tls | None = None

    @classmethod
    def from_config(cls, cfg: EngineConfig) -> Security:
        """The secret (``cfg.secret``, ``cfg.secret_file`` or ``$MOONLET_SECRET``) and TLS (all three PEM files
        or none, as EngineConfig checks) of an engine."""
        cert, key, ca = cfg.tls_cert_file, cfg.tls_key_file, cfg.tls_ca_file
        return cls(load_secret(cfg.secret, cfg.secret_file), Tls(cert, key, ca) if cert and key and ca else None)


PLAIN = Security()

__all__ = ["PLAIN", "Secret", "Security", "Tls", "load_secret"]
