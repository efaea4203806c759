"""etcd metadata, through etcd's v3 JSON gateway over plain HTTP.

Why not a gRPC client: the Python etcd3 client is unmaintained and breaks with
current protobuf/grpcio releases, while the JSON gateway ships with every etcd
v3 server (``/v3/kv/*``, ``/v3/lease/*``) and needs nothing beyond the standard
library.  Descriptors are put under a lease of ``ttl`` seconds that the engine
keeps alive, so a crashed engine's descriptor vanishes within the TTL.
"""

from __future__ import annotations

import base64
import http.client
import json
import threading
import urllib.parse

from ..errors import MetadataError
from .base import MAX_VALUE, MetadataBackend

#: Largest answer read from etcd: a value of MAX_VALUE bytes in base64, plus the JSON around it.
_MAX_ANSWER = MAX_VALUE * 4 // 3 + (64 << 10)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class EtcdMetadata(MetadataBackend):
    """``etcd://host:port[,host:port...][/cluster-id]``: several endpoints are tried in turn."""

    leased = True

    def __init__(self, url: str, timeout: float, ttl: float) -> None:
        u = urllib.parse.urlsplit(url)
        if u.scheme != "etcd" or not u.netloc:
            raise MetadataError(f"metadata URL {url!r} is not of the form etcd://host:port[,host:port][/cluster]")
        self._endpoints = []
        for part in u.netloc.split(","):
            host, _, port = part.rpartition(":")
            if not host or not port.isdigit():
                raise MetadataError(f"etcd endpoint {part!r} in {url!r} is not host:port")
            self._endpoints.append((host.strip("[]"), int(port)))
        self._cluster = u.path.strip("/") or "moonlet"
        self._timeout = timeout
        self._ttl = max(1, int(round(ttl)))
        self._lock = threading.Lock()
        self._lease: str | None = None
        self._published: tuple[str, bytes] | None = None
        self._url = f"etcd://{u.netloc}/{self._cluster}"

    def _key(self, name: str) -> str:
        return f"{self._cluster}/segments/{name}"

    def _call(self, path: str, body: dict) -> dict:
        errors = []
        for host, port in self._endpoints:
            conn = http.client.HTTPConnection(host, port, timeout=self._timeout)
            try:
                conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = resp.read(_MAX_ANSWER + 1)
                if len(data) > _MAX_ANSWER:
                    raise MetadataError(f"etcd {host}:{port} answered {path} with more than {_MAX_ANSWER} bytes")
                if resp.status != 200:
                    raise MetadataError(f"etcd {host}:{port} answered {path} with HTTP {resp.status}: {data[:200]!r}")
                answer = json.loads(data.splitlines()[0] if data else b"{}")  # keepalive streams lines
                if type(answer) is not dict:
                    raise ValueError(f"answer is not a JSON object: {data[:200]!r}")
                return answer
            except (OSError, http.client.HTTPException, ValueError, RecursionError) as e:
                errors.append(f"{host}:{port}: {e}")
            finally:
                conn.close()
        raise MetadataError(f"etcd unreachable ({'; '.join(errors)})")

    def _grant_and_put(self, name: str, descriptor: bytes) -> None:
        lease = self._call("/v3/lease/grant", {"TTL": self._ttl})["ID"]
        self._call("/v3/kv/put", {"key": _b64(self._key(name)), "value": base64.b64encode(descriptor).decode(),
                                  "lease": lease})
        self._lease = lease

    def publish(self, name: str, descriptor: bytes) -> None:
        with self._lock:
            self._published = (name, descriptor)
            if self._lease is None:
                self._grant_and_put(name, descriptor)
            else:
                self._call("/v3/kv/put", {"key": _b64(self._key(name)),
                                          "value": base64.b64encode(descriptor).decode(), "lease": self._lease})

    def keepalive(self) -> None:
        with self._lock:
            if self._published is None:
                return
            if self._lease is not None:
                result = self._call("/v3/lease/keepalive", {"ID": self._lease}).get("result", {})
                if int(result.get("TTL", 0)) > 0:
                    return
            self._grant_and_put(*self._published)  # the lease expired (store restarted, long outage)

    def fetch(self, name: str) -> bytes | None:
        return self.get_key(self._key(name))

    def remove(self, name: str) -> None:
        with self._lock:
            self._call("/v3/kv/deleterange", {"key": _b64(self._key(name))})
            if self._lease is not None:
                try:
                    self._call("/v3/lease/revoke", {"ID": self._lease})
                except MetadataError:
                    pass
            self._lease = None
            self._published = None

    def put_key(self, key: str, value: bytes) -> None:
        self._call("/v3/kv/put", {"key": _b64(key), "value": base64.b64encode(value).decode()})

    def get_key(self, key: str) -> bytes | None:
        kvs = self._call("/v3/kv/range", {"key": _b64(key)}).get("kvs")
        if not kvs:
            return None
        try:
            return base64.b64decode(kvs[0].get("value", ""), validate=True)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise MetadataError(f"etcd {self._url} answered a malformed value for {key!r}: {e!r}") from None

    def delete_key(self, key: str) -> None:
        self._call("/v3/kv/deleterange", {"key": _b64(key)})

    def __str__(self) -> str:
        return self._url
