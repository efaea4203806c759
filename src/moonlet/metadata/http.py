"""HTTP metadata: a client and an embedded server speaking Mooncake's REST shape.

``GET|PUT|DELETE /metadata?key=K``, the value as the request/response body
(JSON here).  Either Mooncake's ``http_metadata_server`` or
``moonlet metadata-server`` can serve either engine's client.

The server answers whoever reaches it, so it holds its ground against them:
a PUT is stored only once exactly its ``Content-Length`` bytes are in (a body
cut off replaces nothing), a value may be at most ``max_value`` bytes and all
of them together ``max_total`` (bodies being received count), at most
``max_clients`` connections are served at once (more are answered 503 and
closed, without a thread), and a request that is not done within ``timeout``
seconds is dropped.  Whoever can PUT can still rewrite any descriptor: with a
cluster secret, engines seal theirs and refuse forged ones (see signed.py).

Leases: moonlet's client PUTs its descriptor with an ``X-Moonlet-TTL: SECONDS``
header and PUTs it again every third of that (the engine's keepalive, as with
etcd and Redis), so the server forgets an engine killed without a goodbye
within the TTL; a clean close DELETEs it at once.  An expired key reads as
absent, and the server drops expired keys as it goes (a bounded number per
poll).  A PUT without the header (Mooncake's keys, other clients) never
expires.  With ``persist`` the store is written to a file (a temporary file
renamed over it, at most once a second, and on stop) and read back at start,
each entry keeping its expiry (in wall-clock time; expired ones are dropped).
The server is one process: it has no replication and no failover; use etcd
where the metadata must outlive a host.
"""

from __future__ import annotations

import base64
import heapq
import http.client
import json
import logging
import os
import socket
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..config import MAX_TIMEOUT
from ..errors import ConfigError, MetadataError
from .base import MAX_VALUE, MetadataBackend

log = logging.getLogger("moonlet.metadata")

KEY_PREFIX = "moonlet/segments/"
MAX_TOTAL = 256 << 20  # bytes of all keys and values a metadata server keeps
MAX_CLIENTS = 64  # connections a metadata server serves at once, a thread each
REQUEST_TIMEOUT = 10.0  # seconds a metadata server gives one request
_ENTRY_COST = 256  # bytes an entry costs beyond its key and value (dict slot, objects), counted in MAX_TOTAL
TTL_HEADER = "X-Moonlet-TTL"  # seconds a PUT value lives unless PUT again; absent: it never expires
MAX_TTL = MAX_TIMEOUT  # the longest lease a metadata server grants, seconds (the longest metadata_ttl)
PERSIST_INTERVAL = 1.0  # seconds between two writes of a metadata server's --persist file
_SWEEP_BATCH = 4096  # expired keys a metadata server drops per poll of its listener
_PERSIST_VERSION = 1


class HttpMetadata(MetadataBackend):
    """Client of an HTTP metadata server at ``url`` (``http://host:port[/metadata]``); the descriptor it
    publishes lives ``ttl`` seconds unless :meth:`keepalive` PUTs it again."""

    leased = True

    def __init__(self, url: str, timeout: float, ttl: float = 10.0) -> None:
        u = urllib.parse.urlsplit(url)
        if u.scheme != "http" or not u.hostname:
            raise MetadataError(f"metadata URL {url!r} is not of the form http://host:port[/metadata]")
        self._host = u.hostname
        self._port = u.port or 80
        self._path = u.path.rstrip("/") or "/metadata"
        self._timeout = timeout
        self._url = url
        if not 0 < ttl <= MAX_TTL:
            raise MetadataError(f"metadata TTL of {ttl} s is out of range: 0 < TTL <= {MAX_TTL:g}")
        self._ttl = f"{ttl:.3f}"
        self._lock = threading.Lock()
        self._published: tuple[str, bytes] | None = None

    def _call(self, method: str, key: str, body: bytes | None = None,
              ttl: str | None = None) -> tuple[int, bytes]:
        query = urllib.parse.urlencode({"key": key})
        conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        try:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            if ttl is not None:
                headers[TTL_HEADER] = ttl
            conn.request(method, f"{self._path}?{query}", body=body, headers=headers)
            resp = conn.getresponse()
            if resp.length is not None and resp.length > MAX_VALUE:
                raise MetadataError(f"metadata server {self._url} answered {method} {key!r} with {resp.length} "
                                    f"bytes, more than the {MAX_VALUE} a value may have")
            data = resp.read(MAX_VALUE + 1)
            if len(data) > MAX_VALUE:
                raise MetadataError(f"metadata server {self._url} answered {method} {key!r} with more than "
                                    f"{MAX_VALUE} bytes, the most a value may have")
            return resp.status, data
        except (OSError, http.client.HTTPException) as e:
            raise MetadataError(f"metadata server {self._url} unreachable ({method} {key!r}): {e}") from None
        finally:
            conn.close()

    def publish(self, name: str, descriptor: bytes) -> None:
        with self._lock:
            self._published = (name, descriptor)
            self._put(KEY_PREFIX + name, descriptor, self._ttl)

    def keepalive(self) -> None:
        """PUT the descriptor again with a fresh TTL (it is back if the server lost it meanwhile)."""
        with self._lock:
            if self._published is not None:
                name, descriptor = self._published
                self._put(KEY_PREFIX + name, descriptor, self._ttl)

    def fetch(self, name: str) -> bytes | None:
        return self.get_key(KEY_PREFIX + name)

    def remove(self, name: str) -> None:
        with self._lock:
            self._published = None
            self.delete_key(KEY_PREFIX + name)

    def put_key(self, key: str, value: bytes) -> None:
        self._put(key, value, None)

    def _put(self, key: str, value: bytes, ttl: str | None) -> None:
        if len(value) > MAX_VALUE:
            raise MetadataError(f"value of {len(value)} bytes for {key!r} is larger than a metadata server "
                                f"keeps ({MAX_VALUE} bytes)")
        status, text = self._call("PUT", key, value, ttl)
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
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: object) -> None:  # keep stderr quiet
        pass

    def setup(self) -> None:
        # On every read and write of the connection (StreamRequestHandler reads it from the instance).
        self.timeout = self.server.request_timeout  # type: ignore[misc]  # typeshed: a ClassVar
        super().setup()

    def handle_one_request(self) -> None:
        self.server.arm(self.connection)  # this request's deadline starts now
        super().handle_one_request()

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
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _refuse(self, status: int, message: str, body: int = 0) -> None:
        """Answer ``status`` and close; first read and drop up to ``max_value`` bytes of a ``body`` still
        coming (in small pieces), so a client busy sending it is not reset before it reads the answer."""
        self.close_connection = True
        self._reply(status, message.encode())
        self.wfile.flush()
        left = min(body, self.server.max_value)
        while left > 0:
            piece = self.rfile.read1(min(left, 65536))
            if not piece:
                break
            left -= len(piece)

    def do_GET(self) -> None:
        key = self._key()
        if key is None:
            return
        value = self.server.get(key)
        if value is None:
            self._reply(404, b"metadata not found")
        else:
            self._reply(200, value, "application/json")

    def do_PUT(self) -> None:
        key = self._key()
        if key is None:
            return
        srv = self.server
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self._refuse(411, "a PUT needs a Content-Length (no chunked bodies)")
            return
        try:
            n = int(self.headers.get("Content-Length", "-1"))
        except ValueError:
            n = -1
        if n < 0:
            self._refuse(411, "a PUT needs a valid Content-Length")
            return
        if n > srv.max_value:
            self._refuse(413, f"value of {n} bytes refused: at most {srv.max_value} bytes a value", n)
            return
        ttl_text = self.headers.get(TTL_HEADER)
        try:
            ttl = None if ttl_text is None else float(ttl_text)
        except ValueError:
            ttl = float("nan")
        if ttl is not None and not 0 < ttl <= MAX_TTL:
            self._refuse(400, f"{TTL_HEADER}: {ttl_text!r} refused: seconds, 0 < TTL <= {MAX_TTL:g}", n)
            return
        cost = len(key) + n + _ENTRY_COST
        if not srv.reserve(cost):
            self._refuse(507, f"metadata store full: it keeps at most {srv.max_total} bytes in all; "
                              f"a value of {n} bytes does not fit", n)
            return
        try:
            try:
                value = self.rfile.read(n)
            except OSError:  # a timeout, or the connection cut at its deadline
                value = b""
            if len(value) != n:
                self._refuse(400, f"body cut off before the {n} bytes announced were in: nothing stored")
                return
            srv.put(key, value, cost, ttl)
        finally:
            srv.release(cost)
        self._reply(200, b"metadata updated")

    def do_DELETE(self) -> None:
        key = self._key()
        if key is None:
            return
        found = self.server.delete(key)
        self._reply(200 if found else 404, b"metadata deleted" if found else b"metadata not found")


class _Server(ThreadingHTTPServer):
    """The store, its byte accounting, and the connections being served (each with its deadline)."""

    daemon_threads = True
    block_on_close = False  # server_close() ends the connections itself
    request_queue_size = 128  # the listen backlog: connections over the limit are accepted and refused at once

    def __init__(self, addr: tuple[str, int], max_value: int, max_total: int, max_clients: int,
                 timeout: float, persist: str | None) -> None:
        super().__init__(addr, _Handler)
        self.max_value = max_value
        self.max_total = max_total
        self.max_clients = max_clients
        self.request_timeout = timeout
        self.store: dict[str, bytes] = {}
        self.expiry: dict[str, float] = {}  # key -> time.monotonic() it expires at; keys PUT without a TTL: absent
        self._due: list[tuple[float, str]] = []  # heap of (expiry, key); stale pairs (renewed keys) skipped
        self.lock = threading.Lock()
        self.used = 0  # bytes the entries cost (keys, values, _ENTRY_COST each)
        self.reserved = 0  # bytes of PUT bodies being received
        self.refused = 0  # connections turned away at max_clients
        self._conns: dict[socket.socket, float] = {}  # connection -> deadline of its current request
        self.persist = persist
        self._dirty = False  # the store changed since the persist file was last written
        self._saved_at = 0.0  # time.monotonic() of that write
        self._save_lock = threading.Lock()  # one writer of the persist file at a time
        self._save_failed = False

    # -- the store

    def reserve(self, cost: int) -> bool:
        """Set ``cost`` bytes aside for a PUT body about to be read; False if the store cannot take them."""
        with self.lock:
            if self.used + self.reserved + cost > self.max_total:
                return False
            self.reserved += cost
            return True

    def release(self, cost: int) -> None:
        with self.lock:
            self.reserved -= cost

    def get(self, key: str) -> bytes | None:
        """The value of ``key``; None if there is none or it expired."""
        with self.lock:
            self._expire(key, time.monotonic())
            return self.store.get(key)

    def put(self, key: str, value: bytes, cost: int, ttl: float | None) -> None:
        """Store ``value`` under ``key``, to expire ``ttl`` seconds from now (never if None)."""
        with self.lock:
            old = self.store.get(key)
            self.store[key] = value
            self.used += cost - (len(key) + len(old) + _ENTRY_COST if old is not None else 0)
            if ttl is None:
                self.expiry.pop(key, None)
            else:
                self._lease(key, time.monotonic() + ttl)
            self._dirty = True

    def delete(self, key: str) -> bool:
        """Remove ``key``; False if there was none (or it had expired)."""
        with self.lock:
            self._expire(key, time.monotonic())
            return self._drop(key)

    def sweep(self) -> None:
        """Drop expired keys, at most _SWEEP_BATCH of them (the rest at the next poll)."""
        now = time.monotonic()
        with self.lock:
            for _ in range(_SWEEP_BATCH):
                if not self._due or self._due[0][0] > now:
                    break
                due, key = heapq.heappop(self._due)
                if self.expiry.get(key) == due:
                    self._drop(key)

    def _lease(self, key: str, due: float) -> None:
        """Let ``key`` expire at ``due`` (lock held); the heap is rebuilt when stale pairs outnumber live ones."""
        self.expiry[key] = due
        heapq.heappush(self._due, (due, key))
        if len(self._due) > 2 * len(self.expiry) + 64:
            self._due = [(d, k) for k, d in self.expiry.items()]
            heapq.heapify(self._due)

    def _expire(self, key: str, now: float) -> None:
        """Drop ``key`` if it has expired (lock held)."""
        due = self.expiry.get(key)
        if due is not None and due <= now:
            self._drop(key)

    def _drop(self, key: str) -> bool:
        """Remove ``key`` and its expiry (lock held); False if it was not there."""
        old = self.store.pop(key, None)
        self.expiry.pop(key, None)
        if old is None:
            return False
        self.used -= len(key) + len(old) + _ENTRY_COST
        self._dirty = True
        return True

    # -- the persist file

    def load(self) -> None:
        """Read the persist file, if there is one, into the (empty) store; expired entries are left out."""
        assert self.persist is not None
        try:
            with open(self.persist, "rb") as f:
                doc = json.load(f)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            raise ConfigError(f"metadata server cannot read its persist file {self.persist!r}: {e}") from None
        if not isinstance(doc, dict) or doc.get("version") != _PERSIST_VERSION or \
                not isinstance(doc.get("entries"), list):
            raise ConfigError(f"{self.persist!r} is not a metadata server persist file (version "
                              f"{_PERSIST_VERSION})")
        wall, now = time.time(), time.monotonic()
        for entry in doc["entries"]:
            try:
                key, text, expires = entry
                value = base64.b64decode(text, validate=True)
                if not isinstance(key, str) or not (expires is None or isinstance(expires, (int, float))):
                    raise ValueError("not [key, base64 value, expiry or null]")
            except (TypeError, ValueError) as e:
                raise ConfigError(f"persist file {self.persist!r} holds a bad entry: {e}") from None
            if expires is not None and expires <= wall:
                continue
            cost = len(key) + len(value) + _ENTRY_COST
            if len(value) > self.max_value or self.used + cost > self.max_total:
                raise ConfigError(f"persist file {self.persist!r} holds more than this server keeps "
                                  f"(at most {self.max_value} bytes a value, {self.max_total} in all)")
            self.put(key, value, cost, None)
            if expires is not None:
                self._lease(key, now + (expires - wall))
        self._dirty = False

    def save(self, force: bool = False) -> None:
        """Write the store to the persist file if it changed (and, unless ``force``, PERSIST_INTERVAL has
        passed since the last write): a temporary file beside it, renamed over it."""
        assert self.persist is not None
        with self._save_lock:
            now = time.monotonic()
            with self.lock:
                if not self._dirty or (not force and now - self._saved_at < PERSIST_INTERVAL):
                    return
                wall = time.time()
                entries = [(k, v, self.expiry.get(k)) for k, v in self.store.items()]
                self._dirty = False
                self._saved_at = now
            tmp = f"{self.persist}.tmp"
            try:
                with open(tmp, "w") as f:
                    f.write(f'{{"version": {_PERSIST_VERSION}, "entries": [')
                    for i, (key, value, due) in enumerate(entries):
                        expires = None if due is None else wall + (due - now)
                        f.write(("," if i else "") + json.dumps([key, base64.b64encode(value).decode(), expires]))
                    f.write("]}\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.persist)
            except BaseException as e:
                with self.lock:
                    self._dirty = True  # try again at the next poll, or at stop()
                if not isinstance(e, OSError):
                    raise
                if not self._save_failed:
                    log.warning("metadata server cannot write its persist file %r: %s", self.persist, e)
                self._save_failed = True
                return
            if self._save_failed:
                log.warning("metadata server writes its persist file %r again", self.persist)
            self._save_failed = False

    # -- connections

    def process_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        with self.lock:
            full = len(self._conns) >= self.max_clients
            if not full:
                self._conns[request] = time.monotonic() + self.request_timeout
        if full:
            self._turn_away(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:  # noqa: BLE001 - e.g. no thread can be started: this connection only
            log.warning("metadata server cannot serve a connection", exc_info=True)
            with self.lock:
                self._conns.pop(request, None)
            self.shutdown_request(request)

    def process_request_thread(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.lock:
                self._conns.pop(request, None)

    def _turn_away(self, request: socket.socket) -> None:
        self.refused += 1
        if self.refused in (1, 10, 100) or self.refused % 1000 == 0:
            log.warning("metadata server refused %d connection(s): at the limit of %d at once",
                        self.refused, self.max_clients)
        body = f"too many connections (at most {self.max_clients} at once)".encode()
        try:
            request.send(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body, socket.MSG_DONTWAIT)
            request.recv(65536, socket.MSG_DONTWAIT)  # what the client sent already: unread, closing would reset
        except OSError:
            pass
        self.shutdown_request(request)

    def arm(self, request: socket.socket) -> None:
        """Start the deadline of the next request on ``request``."""
        with self.lock:
            if request in self._conns:
                self._conns[request] = time.monotonic() + self.request_timeout

    def service_actions(self) -> None:
        """Between polls of the listener: cut the connections whose request ran past its deadline."""
        now = time.monotonic()
        with self.lock:
            late = [c for c, deadline in self._conns.items() if deadline < now]
            for c in late:
                self._conns[c] = float("inf")  # cut once; the thread forgets it as it ends
        for c in late:
            _cut(c)
        self.sweep()
        if self.persist is not None:
            self.save()

    def handle_error(self, request: object, client_address: object) -> None:
        log.debug("metadata server: a connection failed", exc_info=True)

    def server_close(self) -> None:
        super().server_close()
        with self.lock:
            conns = list(self._conns)
        for c in conns:
            _cut(c)


def _cut(sock: socket.socket) -> None:
    """End a connection another thread is blocked on (its recv returns, its send fails)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class MetadataServer:
    """An in-process HTTP metadata server; ``moonlet metadata-server`` runs one in the foreground.

    ``max_value``: bytes of one value; ``max_total``: bytes of all keys and
    values (and of bodies being received); ``max_clients``: connections
    served at once; ``timeout``: seconds one request may take; ``persist``:
    a file the store is kept in across restarts (see the module docstring).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 8080, *, max_value: int = MAX_VALUE,
                 max_total: int = MAX_TOTAL, max_clients: int = MAX_CLIENTS,
                 timeout: float = REQUEST_TIMEOUT, persist: str | None = None) -> None:
        if min(max_value, max_total, max_clients) < 1 or not timeout > 0:
            raise ConfigError(f"metadata server limits must be positive: max_value={max_value}, "
                              f"max_total={max_total}, max_clients={max_clients}, timeout={timeout}")
        self._server = _Server((host, port), max_value, max_total, max_clients, timeout, persist)
        if persist is not None:
            try:
                self._server.load()
            except ConfigError:
                self._server.server_close()
                raise
        self.host, self.port = self._server.socket.getsockname()[:2]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """What engines pass as ``metadata`` to use this server."""
        return f"http://{self.host}:{self.port}/metadata"

    def start(self) -> MetadataServer:
        """Serve from a background thread; return self."""
        self._thread = threading.Thread(target=self._server.serve_forever, name="moonlet-metadata", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until :meth:`stop` (``moonlet metadata-server`` uses :meth:`start`)."""
        self._server.serve_forever()

    def stop(self) -> None:
        """Stop serving; with a persist file, write what changed since its last write."""
        self._server.shutdown()
        self._server.server_close()
        if self._thread:
            self._thread.join(timeout=5)
        if self._server.persist is not None:
            self._server.save(force=True)

    def __enter__(self) -> MetadataServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
