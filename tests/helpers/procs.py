"""Target engines in other processes (tests/peer.py), and readers of what a process holds (/proc).

The readers take a pid, or ``"self"`` for this process: resident memory, threads, open descriptors and CPU
time, so a test can bound what an attack costs its target.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

PEER = str(Path(__file__).parent.parent / "peer.py")


class PeerProcess:
    """A target engine in a subprocess, driven over its stdin/stdout (see tests/peer.py for the commands).

    ``name``, ``addr``, ``size``, ``pid``: its segment name, its first registered buffer and that buffer's
    size (random bytes), and its process id.
    """

    def __init__(self, *args: str, prefix: tuple[str, ...] = ()) -> None:
        """``args``: peer.py's options; ``prefix``: argv that runs the peer elsewhere (e.g. ``ip netns exec NS``)."""
        self.proc = subprocess.Popen([*prefix, sys.executable, PEER, *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._stdin, self._stdout = self.proc.stdin, self.proc.stdout
        line = self._stdout.readline()
        if not line:
            raise RuntimeError(f"peer did not start (exit {self.proc.wait()})")
        info = json.loads(line)
        self.name: str = info["name"]
        self.addr: int = info["addr"]
        self.size: int = info["size"]
        self.pid: int = info["pid"]

    def call(self, command: str) -> dict:
        """Send one command line; its one-line JSON answer."""
        self._stdin.write(command + "\n")
        self._stdin.flush()
        return json.loads(self._stdout.readline())

    def digest(self, addr: int, length: int) -> str:
        """The SHA-256 (hex) of ``length`` bytes at ``addr`` in the peer, computed there."""
        return self.call(f"digest {addr} {length}")["sha256"]

    def kill(self) -> None:
        """SIGKILL: the peer ends without closing anything."""
        self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        """Ask the peer to close its engine and exit (killed if it has not within 10 s)."""
        if self.proc.poll() is None:
            try:
                self._stdin.write("exit\n")
                self._stdin.flush()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def proc_status(pid: int | str, field: str) -> int:
    """A numeric field of /proc/PID/status (``VmRSS`` in KiB, ``Threads``, ...)."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def rss_kib(pid: int | str = "self") -> int:
    """Resident memory of process ``pid``, in KiB."""
    return proc_status(pid, "VmRSS")


def open_fds(pid: int | str = "self") -> int:
    """How many file descriptors process ``pid`` has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int | str) -> float:
    """User + system CPU time of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def wait_threads(limit: int, timeout: float = 5.0) -> int:
    """Wait until at most ``limit`` threads run in this process, or ``timeout`` passes; the count at the end."""
    deadline = time.monotonic() + timeout
    while threading.active_count() > limit and time.monotonic() < deadline:
        time.sleep(0.02)
    return threading.active_count()
