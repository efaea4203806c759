"""Cross-memory attach: ``process_vm_readv`` / ``process_vm_writev`` through ctypes.

The kernel copies between two address spaces in one pass, with no socket and
no shared mapping.  It needs ptrace-level permission over the other process
(same user and, under Yama ``ptrace_scope`` 1, an explicit
``PR_SET_PTRACER``), and both processes in one PID namespace.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import sys

_IOV_MAX = 1024
_PR_SET_PTRACER = 0x59616D61
_PR_SET_PTRACER_ANY = ctypes.c_ulong(-1).value

_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_readv = getattr(_libc, "process_vm_readv", None)
_writev = getattr(_libc, "process_vm_writev", None)
for _fn in (_readv, _writev):
    if _fn is not None:
        _fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_ulong]
        _fn.restype = ctypes.c_ssize_t

AVAILABLE = _readv is not None and _writev is not None


def allow_peers() -> None:
    """Let same-user peers attach to this process even under Yama ``ptrace_scope`` 1 (no-op elsewhere)."""
    if _libc is not None:
        _libc.prctl(_PR_SET_PTRACER, ctypes.c_ulong(_PR_SET_PTRACER_ANY), 0, 0, 0)


def copy(pid: int, local: list[int], remote: list[int], into_local: bool) -> None:
    """Copy between this process's ``local`` and process ``pid``'s ``remote`` ranges.

    Both are flat ``[addr, len, addr, len, ...]`` lists of the same shape (range
    i has the same length on both sides).  ``into_local`` reads the remote ranges
    into the local ones; otherwise the local ranges are written into the remote
    ones.  Raises OSError (EPERM, ESRCH, EFAULT, ...) unless every byte moved.
    """
    fn = _readv if into_local else _writev
    if fn is None:
        raise OSError(errno.ENOSYS, "process_vm_readv/writev are not available on this platform")
    if len(local) == 2 and len(remote) == 2:  # one range, a lone request: no slicing or format building
        if local[1] != remote[1]:
            raise ValueError("local and remote ranges differ in shape")
        _check(fn(pid, _PAIR.pack(*local), 1, _PAIR.pack(*remote), 1, 0), local[1])
        return
    if local[1::2] != remote[1::2]:
        raise ValueError("local and remote ranges differ in shape")
    step = 2 * _IOV_MAX
    for i in range(0, len(local), step):
        lchunk, rchunk = local[i:i + step], remote[i:i + step]
        _check(fn(pid, struct.pack(f"<{len(lchunk)}Q", *lchunk), len(lchunk) // 2,
                  struct.pack(f"<{len(rchunk)}Q", *rchunk), len(rchunk) // 2, 0), sum(lchunk[1::2]))


_PAIR = struct.Struct("<QQ")  # one iovec


def _check(done: int, want: int) -> None:
    """Raise OSError unless a process_vm_readv/writev call that returned ``done`` moved ``want`` bytes."""
    if done < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    if done != want:
        raise OSError(errno.EFAULT, f"partial copy: {done} of {want} bytes")


def probe() -> tuple[bool, str]:
    """Try a real cross-memory read of this process from a child process: (works, why or why not)."""
    if not AVAILABLE:
        return False, "process_vm_readv is not available (not Linux)"
    import subprocess

    secret = os.urandom(16)
    buf = ctypes.create_string_buffer(secret, 16)
    code = ("import sys; from moonlet.transport.shm import cma; import ctypes;"
            "b = ctypes.create_string_buffer(16);"
            "cma.copy(int(sys.argv[1]), [ctypes.addressof(b), 16], [int(sys.argv[2]), 16], True);"
            "print(b.raw.hex())")
    allow_peers()
    try:
        r = subprocess.run([sys.executable, "-c", code, str(os.getpid()), str(ctypes.addressof(buf))],
                           capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"probe could not run: {e}"
    if r.returncode == 0 and r.stdout.strip() == secret.hex():
        return True, "a child process read this process's memory with process_vm_readv"
    err = (r.stderr.strip().splitlines() or ["no output"])[-1]
    scope = ""
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            scope = f.read().strip()
    except OSError:
        pass
    hint = f"Yama ptrace_scope is {scope} (2 and 3 forbid it; set 0 or 1)" if scope in ("2", "3") else \
        "the kernel refused ptrace access (different users, a seccomp/container policy, or no CAP_SYS_PTRACE)"
    return False, f"{err}; {hint}. Same-host requests will use TCP."


def socket_owned_by(sock: socket.socket, pid: int) -> bool:
    """Whether process ``pid`` holds the other end of the loopback TCP connection ``sock``.

    A peer's claimed pid is trusted for cross-memory copies only after this
    check: otherwise any local client could aim the target at a third process.
    """
    if sock.family not in (socket.AF_INET, socket.AF_INET6):  # with TLS, the local end of a relay's socket
        return False  # pair: who holds the TCP connection cannot be told from it, so no attaching
    try:
        peer = sock.getpeername()[:2]
        me = sock.getsockname()[:2]
    except OSError:
        return False
    inode = _tcp_inode(local=peer, remote=me)
    if inode is None:
        return False
    want = f"socket:[{inode}]"
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == want:
                return True
        except OSError:
            continue
    return False


def _hexaddr(host: str, port: int) -> tuple[str, str]:
    packed = socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    if len(packed) == 4:
        text = f"{struct.unpack('<I', packed)[0]:08X}"
    else:
        text = "".join(f"{w:08X}" for w in struct.unpack("<4I", packed))
    return text, f"{port:04X}"


def _tcp_inode(local: tuple[str, int], remote: tuple[str, int]) -> int | None:
    """Inode of the TCP socket whose local end is ``local`` and remote end ``remote`` (/proc/net/tcp*)."""
    want_l, want_r = _hexaddr(*local), _hexaddr(*remote)
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    la, lp = parts[1].split(":")
                    ra, rp = parts[2].split(":")
                    if (la, lp) == want_l and (ra, rp) == want_r:
                        return int(parts[9])
        except OSError:
            continue
    return None
