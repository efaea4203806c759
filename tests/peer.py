"""A moonlet engine in its own process, driven over stdin/stdout by the tests.

Prints one JSON line when ready: {"name", "addr", "size", "pid"}.  Then reads
commands, one per line, answering each with one JSON line:
  register SIZE     -> {"addr": A}   register another random-filled buffer
  allocate SIZE [ro] [noread] -> {"addr": A}  engine.allocate() a shareable random-filled buffer
                                  (ro: remote_write=False, noread: remote_read=False)
  unregister ADDR   -> {"ok": true}
  digest ADDR LEN   -> {"sha256": H} hash of local (host or GPU) memory, to check bytes independently
  exit              -> closes the engine
"""

import argparse
import json
import os
import sys

from helpers.memory import random_mmap, sha
from moonlet import EngineConfig, TransferEngine
from moonlet.memory import view_at


def view_addr(obj) -> int:
    """Address of a bytes/bytearray object's data (bytes: read-only use only)."""
    import ctypes

    if isinstance(obj, bytes):
        return ctypes.cast(ctypes.c_char_p(obj), ctypes.c_void_p).value
    return ctypes.addressof(ctypes.c_char.from_buffer(obj))


def drop_cap_sys_ptrace() -> None:
    """Remove CAP_SYS_PTRACE from this process (capset(2) through ctypes)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # two {effective, permitted, inheritable} words
    if libc.capget(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    bit = 1 << 19  # CAP_SYS_PTRACE
    data[0] &= ~bit
    data[1] &= ~bit
    if libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=64 << 20)
    ap.add_argument("--metadata", default="p2p")
    ap.add_argument("--name")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--read-only", action="store_true")
    ap.add_argument("--no-ptrace", action="store_true", help="drop CAP_SYS_PTRACE: attaching to others fails")
    ap.add_argument("--gpu", type=int, help="register GPU memory on this device instead of host memory")
    ap.add_argument("--ttl", type=float, default=10.0, help="metadata lease (etcd, Redis), seconds")
    ap.add_argument("--config", default="{}", help="more EngineConfig fields, as a JSON object")
    args = ap.parse_args()
    if args.no_ptrace:
        drop_cap_sys_ptrace()
    eng = TransferEngine(args.name, args.metadata, config=EngineConfig(port=args.port, metadata_ttl=args.ttl,
                                                                     **json.loads(args.config)))
    keep = []

    gpu_ranges = []

    def new_buffer(size: int, **rights) -> int:
        if args.gpu is not None:
            from moonlet import gpu

            ptr = gpu.alloc(args.gpu, size)
            data = bytes(os.urandom(size))
            gpu.memcpy(ptr, view_addr(data), size, args.gpu)
            gpu_ranges.append((ptr, size))
            return eng.register(ptr, size, **rights).addr
        mem = random_mmap(size)
        keep.append(mem)
        return eng.register(mem, **rights).addr

    def read_back(a: int, n: int) -> bytes:
        if any(p <= a < p + sz for p, sz in gpu_ranges):
            from moonlet import gpu

            host = bytearray(n)
            gpu.memcpy(view_addr(host), a, n, args.gpu)
            return bytes(host)
        return bytes(view_at(a, n))

    addr = new_buffer(args.size, remote_write=not args.read_only)
    print(json.dumps({"name": eng.name, "addr": addr, "size": args.size, "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        cmd, *rest = line.split()
        if cmd == "register":
            print(json.dumps({"addr": new_buffer(int(rest[0]))}), flush=True)
        elif cmd == "allocate":
            buf = eng.allocate(int(rest[0]), remote_write="ro" not in rest[1:], remote_read="noread" not in rest[1:])
            view_at(buf.addr, buf.length)[:] = os.urandom(buf.length)
            print(json.dumps({"addr": buf.addr}), flush=True)
        elif cmd == "unregister":
            eng.unregister(int(rest[0]))
            print(json.dumps({"ok": True}), flush=True)
        elif cmd == "digest":
            a, n = int(rest[0]), int(rest[1])
            print(json.dumps({"sha256": sha(read_back(a, n))}), flush=True)
        elif cmd == "exit":
            break
    eng.close()


if __name__ == "__main__":
    main()
