"""Runs one side of a Mooncake Transfer Engine benchmark (P2PHANDSHAKE; protocol ``$MOONCAKE_PROTOCOL``, tcp).

Executed with the Python of a virtualenv that has ``mooncake-transfer-engine-non-cuda``
(or, for GPU memory, ``$MOONLET_PEER_VRAM``, the CUDA wheel); ``tcp_vs_baselines.py``
and ``compare.py`` start it.  Target: prints ``READY host:port`` and waits
for stdin to close.  Initiator: runs the rows given as JSON and prints one JSON
result per row.  Nothing of moonlet is imported here.
"""

import json
import os
import sys

from _worker_rows import memory, run_row


def engine():
    from mooncake.engine import TransferEngine

    eng = TransferEngine()
    protocol = os.environ.get("MOONCAKE_PROTOCOL", "tcp")
    rc = eng.initialize("127.0.0.1", "P2PHANDSHAKE", protocol, "")
    if rc != 0:
        raise SystemExit(f"mooncake initialize (protocol {protocol}) failed: {rc}")
    return eng


def main():
    role, size = sys.argv[1], int(sys.argv[2])
    eng = engine()
    addr, _keep, ordinal = memory(role, size)  # _keep: the memory lives as long as this function
    if eng.register_memory(addr, size, "cpu:0" if ordinal is None else f"cuda:{ordinal}") != 0:
        raise SystemExit("mooncake register_memory failed")
    if role == "target":
        print(f"READY 127.0.0.1:{eng.get_rpc_port()}", flush=True)
        sys.stdin.read()
        return
    target = sys.argv[3]
    rows = json.loads(sys.argv[4])
    remote = eng.get_first_buffer_address(target)
    for op, block, batch, threads, duration, *adjacent in rows:
        stride = block if adjacent and adjacent[0] else block * 2  # scattered unless asked for adjacent blocks
        fn = eng.batch_transfer_sync_write if op == "write" else eng.batch_transfer_sync_read
        lists = []
        for t in range(threads):
            base = t * stride * batch
            lists.append(([addr + base + j * stride for j in range(batch)],
                          [remote + base + j * stride for j in range(batch)], [block] * batch))

        def transfer(t, lists=lists, fn=fn):
            rc = fn(target, *lists[t])
            return None if rc == 0 else rc

        run_row(op, block, batch, threads, duration, transfer)


if __name__ == "__main__":
    main()
