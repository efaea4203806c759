"""Redis metadata through redis-py (maintained, the field's own client).

Descriptors are set with an expiry of ``ttl`` seconds that the engine keeps
refreshing, so a crashed engine's descriptor vanishes within the TTL.
Credentials come from the URL and are never printed (``str()`` hides them).
"""

from __future__ import annotations

import threading
import urllib.parse

from ..errors import MetadataError
from .base import MAX_VALUE, MetadataBackend


class RedisMetadata(MetadataBackend):
    """``redis://[user:password@]host:port[/db][?cluster=ID]``."""

    leased = True

    def __init__(self, url: str, timeout: float, ttl: float) -> None:
        try:
            import redis
        except ImportError:
            raise MetadataError("Redis metadata needs redis-py: pip install 'moonlet[redis]'") from None
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("redis", "rediss") or not u.hostname:
            raise MetadataError("metadata URL is not of the form redis://[user:pass@]host:port[/db][?cluster=ID]")
        query = urllib.parse.parse_qs(u.query)
        self._cluster = query.pop("cluster", ["moonlet"])[0]
        clean = urllib.parse.urlunsplit((u.scheme, u.netloc, u.path, urllib.parse.urlencode(query, doseq=True), ""))
        self._client = redis.Redis.from_url(clean, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._errors = (redis.RedisError, OSError)
        self._ttl_ms = max(1000, int(ttl * 1000))
        self._lock = threading.Lock()
        self._published: tuple[str, bytes] | None = None
        port = f":{u.port}" if u.port else ""
        self._shown = f"{u.scheme}://{u.hostname}{port}{u.path or ''}?cluster={self._cluster}"

    def _key(self, name: str) -> str:
        return f"{self._cluster}/segments/{name}"

    def _do(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except self._errors as e:
            raise MetadataError(f"Redis {self._shown} failed {what}: {type(e).__name__}: {e}") from None

    def publish(self, name: str, descriptor: bytes) -> None:
        with self._lock:
            self._published = (name, descriptor)
            self._do("SET", self._client.set, self._key(name), descriptor, px=self._ttl_ms)

    def keepalive(self) -> None:
        with self._lock:
            if self._published is None:
                return
            name, descriptor = self._published
            if not self._do("PEXPIRE", self._client.pexpire, self._key(name), self._ttl_ms):
                self._do("SET", self._client.set, self._key(name), descriptor, px=self._ttl_ms)  # it had expired

    def fetch(self, name: str) -> bytes | None:
        return self.get_key(self._key(name))

    def remove(self, name: str) -> None:
        with self._lock:
            self._published = None
            self._do("DEL", self._client.delete, self._key(name))

    def put_key(self, key: str, value: bytes) -> None:
        self._do("SET", self._client.set, key, value)

    def get_key(self, key: str) -> bytes | None:
        """The value of ``key``, read only up to MAX_VALUE + 1 bytes (a larger one is refused)."""
        pipe = self._client.pipeline()  # one round trip, atomic: whether it exists, and its head
        pipe.exists(key)
        pipe.getrange(key, 0, MAX_VALUE)
        exists, value = self._do("GET", pipe.execute)
        if not exists:
            return None
        if len(value) > MAX_VALUE:
            raise MetadataError(f"Redis {self._shown} holds more than {MAX_VALUE} bytes under {key!r}: refused")
        return value

    def delete_key(self, key: str) -> None:
        self._do("DEL", self._client.delete, key)

    def close(self) -> None:
        self._client.close()

    def __str__(self) -> str:
        return self._shown
