"""A real Mooncake engine driven line by line, for the wire-interop tests.

Run as a script under an interpreter that has Mooncake's wheel, it reads one
JSON command per line on stdin and answers one JSON line on stdout.  Imported
by the tests, :class:`MooncakePeer` starts it and sends commands.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def mooncake_python() -> str | None:
    """An interpreter with Mooncake's wheel: $MOONLET_MOONCAKE_PYTHON, or the benchmarks' peer venv."""
    env = os.environ.get("MOONLET_MOONCAKE_PYTHON")
    if env:
        return env
    venv = HERE.parent / ".bench" / "mooncake" / "bin" / "python"
    return str(venv) if venv.exists() else None


NO_MOONCAKE = ("no Mooncake interpreter (set MOONLET_MOONCAKE_PYTHON, or run benchmarks/compare.py once to build "
               ".bench/mooncake; .ci/run builds it)")


class MooncakePeer:
    """A Mooncake engine in a child process (its own virtualenv)."""

    def __init__(self, metadata: str, hostname: str = "127.0.0.1", size: int = 4 << 20) -> None:
        python = mooncake_python()
        assert python is not None
        self.proc = subprocess.Popen([python, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        info = self.call(op="start", metadata=metadata, hostname=hostname, size=size)
        self.name: str = info["name"]
        self.addr: int = info["addr"]
        self.size: int = size

    def call(self, **command: object) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"Mooncake peer exited (code {self.proc.wait(10)}) on {command}")
        return json.loads(line)

    def close(self) -> None:
        try:
            self.call(op="quit")
        except (OSError, RuntimeError, ValueError):
            pass
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _serve() -> None:  # runs under Mooncake's interpreter
    import ctypes

    from mooncake.engine import TransferEngine, TransferNotify, TransferOpcode

    engine = TransferEngine()
    mem = None

    def sha(addr: int, n: int) -> str:
        return hashlib.sha256(ctypes.string_at(addr, n)).hexdigest()

    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "start":
            rc = engine.initialize(cmd["hostname"], cmd["metadata"], "tcp", "")
            mem = ctypes.create_string_buffer(os.urandom(cmd["size"]), cmd["size"])
            addr = ctypes.addressof(mem)
            rc2 = engine.register_memory(addr, cmd["size"])
            p2p = cmd["metadata"] == "P2PHANDSHAKE"
            out = {"rc": [rc, rc2], "addr": addr,
                   "name": f"{cmd['hostname']}:{engine.get_rpc_port()}" if p2p else cmd["hostname"]}
        elif op == "sha":
            out = {"sha": sha(cmd["addr"], cmd["n"])}
        elif op in ("write", "read"):
            opcode = TransferOpcode.Write if op == "write" else TransferOpcode.Read
            rc = engine.transfer_sync(cmd["segment"], cmd["local"], cmd["remote"], cmd["n"], opcode)
            out = {"rc": rc, "sha": sha(cmd["local"], cmd["n"])}
        elif op == "batch":
            opcode = TransferOpcode.Write if cmd["write"] else TransferOpcode.Read
            rc = engine.batch_transfer_sync(cmd["segment"], cmd["locals"], cmd["remotes"], cmd["lengths"], opcode)
            out = {"rc": rc, "sha": [sha(a, n) for a, n in zip(cmd["locals"], cmd["lengths"])]}
        elif op == "notify":
            rc = engine.transfer_sync(cmd["segment"], cmd["local"], cmd["remote"], cmd["n"], TransferOpcode.Write,
                                      TransferNotify(cmd["name"], cmd["msg"]))
            out = {"rc": rc}
        elif op == "notifies":
            out = {"notes": [[n.name, n.msg] for n in engine.get_notifies()]}
        elif op == "quit":
            print(json.dumps({}), flush=True)
            return
        else:
            out = {"error": f"unknown op {op}"}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    _serve()
