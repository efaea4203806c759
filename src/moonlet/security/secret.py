"""The cluster secret: loaded once per engine, used for MACs under labels that keep each use apart."""

from __future__ import annotations

import hashlib
import hmac
import os

from ..errors import ConfigError


class Secret:
    """The cluster secret. Its repr never shows it, so it cannot end up in a log or a traceback."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ConfigError("the cluster secret must be at least 16 bytes long")
        self._key = key

    def mac(self, label: bytes, *parts: bytes) -> bytes:
        """HMAC-SHA256 under the secret of ``label`` and ``parts``, each length-prefixed (unambiguous).

        Every use has its own label (the two AUTH directions, descriptors), so
        no MAC made for one use is valid for another.
        """
        h = hmac.new(self._key, digestmod=hashlib.sha256)
        for part in (label, *parts):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
        return h.digest()

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
