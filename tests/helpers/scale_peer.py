"""One initiator process of tests/test_scale.py.

    python scale_peer.py moves TARGET ADDR SPAN SEED ROUNDS
        random WRITEs and READs inside [ADDR, ADDR+SPAN) of TARGET, every READ compared with what this
        process wrote there; then the whole span written once more. Prints {"ok": true, "sha256": ...} (of
        the span as this process last wrote it) or {"ok": false, "error": ...}.
    python scale_peer.py flood TARGET ADDR
        sends one-byte WRITE frames to TARGET as fast as the socket takes them, pipelined, reading the replies
        in a second thread, until stdin closes; then prints {"frames": count}.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import sys
import threading

from moonlet import EngineConfig, Op, TransferEngine
from moonlet.transport.tcp import protocol as P


def moves(target: str, addr: int, span: int, seed: int, rounds: int) -> dict:
    rng = random.Random(seed)
    shadow = bytearray(span)  # what this process wrote into the target's span, as far as it knows
    with TransferEngine(config=EngineConfig(transports=("tcp",), request_timeout=60.0)) as eng:
        local = bytearray(span)
        buf = eng.register(local)
        base = buf.addr
        eng.submit_many(Op.WRITE, target, [base], [addr], [span]).check()  # all zeros: the shadow's state
        for _ in range(rounds):
            n = rng.randint(1, 8)
            ranges = []
            taken: list[tuple[int, int]] = []
            while len(ranges) < n:  # disjoint ranges, so one batch's order does not matter
                length = rng.randint(1, span // 16)
                off = rng.randrange(0, span - length)
                if all(off + length <= a or b <= off for a, b in taken):
                    taken.append((off, off + length))
                    ranges.append((off, length))
            offs = [o for o, _ in ranges]
            lens = [n for _, n in ranges]
            if rng.random() < 0.5:
                for off, length in ranges:
                    local[off:off + length] = data = os.urandom(length)
                    shadow[off:off + length] = data
                eng.submit_many(Op.WRITE, target, [base + o for o in offs], [addr + o for o in offs], lens).check()
            else:
                for off, length in ranges:
                    local[off:off + length] = bytes(length)
                eng.submit_many(Op.READ, target, [base + o for o in offs], [addr + o for o in offs], lens).check()
                for off, length in ranges:
                    if local[off:off + length] != shadow[off:off + length]:
                        return {"ok": False, "error": f"read [{off}, +{length}) differs from what was written"}
        local[:] = os.urandom(span)
        eng.submit_many(Op.WRITE, target, [base], [addr], [span]).check()
        return {"ok": True, "sha256": hashlib.sha256(local).hexdigest()}


def flood(target: str, addr: int) -> dict:
    host, port = target.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    sock.sendall(P.encode_hello("flooder"))
    frames = [0]
    stop = threading.Event()

    def drain() -> None:
        while not stop.is_set():
            try:
                if not sock.recv(1 << 20):
                    return
            except OSError:
                return

    threading.Thread(target=drain, daemon=True).start()
    chunk = b"".join(P.encode_request(P.WRITE, i, [(addr, 1)]) + b"x" for i in range(1000))

    def send() -> None:
        while not stop.is_set():
            try:
                sock.sendall(chunk)
            except OSError:
                return
            frames[0] += 1000

    threading.Thread(target=send, daemon=True).start()
    print(json.dumps({"flooding": True}), flush=True)
    sys.stdin.read()
    stop.set()
    sock.close()
    return {"frames": frames[0]}


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "moves":
        out = moves(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    else:
        out = flood(sys.argv[2], int(sys.argv[3]))
    print(json.dumps(out), flush=True)
