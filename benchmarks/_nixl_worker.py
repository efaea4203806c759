"""Runs one side of a NIXL (UCX backend) benchmark between two processes.

Executed with the Python of a virtualenv that has ``nixl-cu12``; ``compare.py``
starts it. Target: prints ``READY <metadata hex> <buffer address>`` and waits
for stdin to close. Initiator: runs the rows given as JSON and prints one JSON
result per row. Set ``UCX_TLS=tcp`` in the environment to force TCP, ``MOONLET_PEER_VRAM`` for GPU memory
(see ``_worker_rows.memory``).
Nothing of moonlet is imported here.
"""

import json
import os
import sys
import time

from _worker_rows import memory, run_row


def agent(name):
    try:
        from nixl_cu12._api import nixl_agent, nixl_agent_config
    except ImportError:
        from nixl._api import nixl_agent, nixl_agent_config
    return nixl_agent(name, nixl_agent_config(backends=["UCX"]))


def main():
    role, size = sys.argv[1], int(sys.argv[2])
    addr, _keep, ordinal = memory(role, size)  # _keep: the memory lives as long as this function
    kind, dev = ("DRAM", 0) if ordinal is None else ("VRAM", ordinal)
    a = agent(role)
    a.register_memory([(addr, size, dev, "")], kind)
    if role == "target":
        print(f"READY {a.get_agent_metadata().hex()} {addr}", flush=True)
        sys.stdin.read()
        return
    remote_name = a.add_remote_agent(bytes.fromhex(sys.argv[3]))
    remote = int(sys.argv[4])
    remote_dev = 0 if ordinal is None else int(os.environ["MOONLET_PEER_VRAM"].split(",")[1])
    rows = json.loads(sys.argv[5])
    for op, block, batch, threads, duration, *adjacent in rows:
        stride = block if adjacent and adjacent[0] else block * 2  # scattered unless asked for adjacent blocks
        handles = []
        for t in range(threads):
            base = t * stride * batch
            local = a.get_xfer_descs([(addr + base + j * stride, block, dev) for j in range(batch)], kind)
            far = a.get_xfer_descs([(remote + base + j * stride, block, remote_dev) for j in range(batch)], kind)
            handles.append(a.initialize_xfer(op.upper(), local, far, remote_name))

        def transfer(t, handles=handles):
            state = a.transfer(handles[t])
            give_up = time.perf_counter() + 10.0  # a transfer that does not finish is reported, not waited on
            while state == "PROC" and time.perf_counter() < give_up:
                state = a.check_xfer_state(handles[t])
            return None if state == "DONE" else state

        run_row(op, block, batch, threads, duration, transfer)
        for h in handles:
            a.release_xfer_handle(h)


if __name__ == "__main__":
    main()
