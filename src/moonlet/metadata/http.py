"""HTTP metadata: a client and an embedded server speaking Mooncake's REST shape.

``GET|PUT|DELETE /metadata?key=K``, the value as the request/response body
(JSON here).  Either Mooncake's ``http_metadata_server`` or
``moonlet metadata-server`` can serve either engine's client.
"""

from __future__ import annotations

import http.client
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..errors import MetadataError
from .base import MetadataBackend

KEY_PREFIX = "moonlet/segments/"
MAX_VALUE = 64 * 1024 * 1024


class HttpMetadata(MetadataBackend):
    """Client of an HTTP metadata server at ``url`` (``http://host:port[/metadata]``)."""

    def __init__(self, url: str, timeout: float) -> None:
        u = urllib.parse.urlsplit(url)
        if u.scheme != "http" or not u.hostname:
            raise MetadataError(f"metadata URL {url!r} is not of the form http://host:port[/metadata]")
        self._host = u.hostname
        self._port = u.port or 80
        self._path = u.path.rstrip("/") or "/metadata"
        self._timeout = timeout
        self._url = url

    def _call(self, method: str, key: str, body: bytes | None = None) -> tuple[int, bytes]:
        query = urllib.parse.urlencode({"key": key})
        conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        try:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, f"{self._path}?{query}", body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise MetadataError(f"metadata server {self._url} unreachable ({method} {key!r}): {e}") from None
        finally:
            conn.close()

    def publish(self, name: str, descriptor: bytes) -> None:
        self.put_key(KEY_PREFIX + name, descriptor)

    def fetch(self, name: str) -> bytes | None:
        return self.get_key(KEY_PREFIX + name)

    def remove(self, name: str) -> None:
        self.delete_key(KEY_PREFIX + name)

    def put_key(self, key: str, value: bytes) -> None:
        status, text = self._call("PUT", key, value)
        if status != 200:
            raise MetadataError(f"metadata server {self._url} refused PUT {key!r}: HTTP {status} {text[:200]!r}")

    def get_key(self, key: str) -> bytes | None:
        status, body = self._call("GET", key)
        if status == 404:
            return None
        if status != 200:
            raise MetadataError(f"metadata server {self._url} failed GET {key!r}: HTTP {status} {body[:200]!r}")
        return body

    def delete_key(self, key: str) -> None:
        status, text = self._call("DELETE", key)
        if status not in (200, 404):
            raise MetadataError(f"metadata server {self._url} refused DELETE {key!r}: HTTP {status}")

    def __str__(self) -> str:
        return self._url


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: object) -> None:  # keep stderr quiet
        pass

    def _key(self) -> str | None:
        u = urllib.parse.urlsplit(self.path)
        if u.path.rstrip("/") != "/metadata":
            self._reply(404, b"unknown path; use /metadata?key=...")
            return None
        keys = urllib.parse.parse_qs(u.query).get("key")
        if not keys:
            self._reply(400, b"missing ?key=")
            return None
        return keys[0]

    def _reply(self, status: int, body: bytes, ctype: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        key = self._key()
        if key is None:
            return
        with self.server.lock:
            value = self.server.store.get(key)
        if value is None:
            self._reply(404, b"metadata not found")
        else:
            self._reply(200, value, "application/json")

    def do_PUT(self) -> None:
        key = self._key()
        if key is None:
            return
        try:
            n = int(self.headers.get("Content-Length", "-1"))
        except ValueError:
            n = -1
        if not 0 <= n <= MAX_VALUE:
            self._reply(411 if n < 0 else 413, b"Content-Length required, at most 64 MiB")
            self.close_connection = True
            return
        value = self.rfile.read(n)
        with self.server.lock:
            self.server.store[key] = value
        self._reply(200, b"metadata updated")

    def do_DELETE(self) -> None:
        key = self._key()
        if key is None:
            return
        with self.server.lock:
            found = self.server.store.pop(key, None) is not None
        self._reply(200 if found else 404, b"metadata deleted" if found else b"metadata not found")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr: tuple[str, int]) -> None:
        super().__init__(addr, _Handler)
        self.store: dict[str, bytes] = {}
        self.lock = threading.Lock()


class MetadataServer:
    """An in-process HTTP metadata server; ``moonlet metadata-server`` runs one in the foreground."""

    def __init__(self, host: str = "127.0.0.1", port: int = 8080) -> None:
        self._server = _Server((host, port))
        self.host, self.port = self._server.server_address[:2]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metadata"

    def start(self) -> "MetadataServer":
        """Serve from a background thread; return self."""
        self._thread = threading.Thread(target=self._server.serve_forever, name="moonlet-metadata", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread:
            self._thread.join(timeout=5)

    def __enter__(self) -> "MetadataServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
