"""Real etcd and Redis servers on loopback ports, started and stopped by the tests themselves."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{binary} is not installed; .ci/run installs it (apt-get install etcd-server redis-server)")
        pytest.skip(f"{binary} is not installed here (apt-get install etcd-server redis-server)")
    return path


class Store:
    """One server process; ``stop`` and ``start`` again keep the same port (and etcd's data)."""

    def __init__(self, kind: str, workdir: str, host: str = "127.0.0.1") -> None:
        self.kind = kind
        self.host = host
        self.port = free_port()
        self._peer_port = free_port()
        self._dir = workdir
        self.proc: subprocess.Popen | None = None
        self.binary = need("etcd" if kind == "etcd" else "redis-server")

    @property
    def url(self) -> str:
        return f"{self.kind}://{self.host}:{self.port}"

    def start(self) -> Store:
        if self.kind == "etcd":
            cmd = [self.binary, "--data-dir", os.path.join(self._dir, "etcd"), "--name", "t",
                   "--listen-client-urls", f"http://{self.host}:{self.port}",
                   "--advertise-client-urls", f"http://{self.host}:{self.port}",
                   "--listen-peer-urls", f"http://127.0.0.1:{self._peer_port}",
                   "--initial-advertise-peer-urls", f"http://127.0.0.1:{self._peer_port}",
                   "--initial-cluster", f"t=http://127.0.0.1:{self._peer_port}"]
        else:
            cmd = [self.binary, "--port", str(self.port), "--bind", self.host, "--save", "", "--appendonly", "no",
                   "--dir", self._dir]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self._ready():
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.kind} did not start on port {self.port}")

    def _ready(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                if self.kind == "redis":
                    s.sendall(b"PING\r\n")
                    return s.recv(16).startswith(b"+PONG")
                s.sendall(b"GET /health HTTP/1.0\r\n\r\n")
                return b"true" in s.recv(4096)
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
