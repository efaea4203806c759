"""The same Mooncake-API scenarios, runnable against moonlet.mooncake or mooncake.engine.

    python tests/compat_scenarios.py moonlet|mooncake   -> one JSON object: scenario -> outcome

Outcomes are return codes (batch ids reduced to "id" / 0) and whether bytes
matched, so the two implementations' outputs can be compared as they are.
Both engines of a scenario live in this process and talk over TCP, P2PHANDSHAKE.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time


def load(impl: str):
    if impl == "mooncake":
        from mooncake.engine import TransferEngine, TransferNotify, TransferOpcode
    else:
        from moonlet.mooncake import TransferEngine, TransferNotify, TransferOpcode
    return TransferEngine, TransferOpcode, TransferNotify


def run(impl: str) -> dict:
    TransferEngine, TransferOpcode, TransferNotify = load(impl)
    out: dict = {}
    target, init = TransferEngine(), TransferEngine()
    out["initialize"] = [target.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", ""),
                         init.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "")]
    name = f"127.0.0.1:{target.get_rpc_port()}"
    size = 1 << 20
    tbuf, ibuf = ctypes.create_string_buffer(size), ctypes.create_string_buffer(size)
    taddr, iaddr = ctypes.addressof(tbuf), ctypes.addressof(ibuf)
    out["register"] = [target.register_memory(taddr, size), init.register_memory(iaddr, size)]
    out["first_buffer"] = init.get_first_buffer_address(name) == taddr

    def fill(n: int) -> bytes:
        data = os.urandom(n)
        ctypes.memmove(iaddr, data, n)
        return data

    data = fill(65536)
    out["sync_write"] = [init.transfer_sync_write(name, iaddr, taddr + 4096, 65536),
                         target.read_bytes_from_buffer(taddr + 4096, 65536) == data]
    ctypes.memmove(iaddr, b"\0" * 65536, 65536)
    out["sync_read"] = [init.transfer_sync_read(name, iaddr, taddr + 4096, 65536),
                        ctypes.string_at(iaddr, 65536) == data]
    data = fill(8 * 4096)
    out["transfer_sync"] = [init.transfer_sync(name, iaddr, taddr, 4096, TransferOpcode.Write),
                            target.read_bytes_from_buffer(taddr, 4096) == data[:4096]]
    rc = init.batch_transfer_sync_write(name, [iaddr + i * 4096 for i in range(8)],
                                        [taddr + (7 - i) * 8192 for i in range(8)], [4096] * 8)
    out["batch_sync_write"] = [rc, all(target.read_bytes_from_buffer(taddr + (7 - i) * 8192, 4096)
                                       == data[i * 4096:(i + 1) * 4096] for i in range(8))]
    ctypes.memmove(iaddr, b"\0" * 65536, 65536)
    bid = init.batch_transfer_async_read(name, [iaddr + i * 4096 for i in range(8)],
                                         [taddr + (7 - i) * 8192 for i in range(8)], [4096] * 8)
    out["batch_async_read"] = ["id" if bid else 0, init.get_batch_transfer_status([bid]),
                               ctypes.string_at(iaddr, 8 * 4096) == data]
    data = fill(4096)
    bid = init.transfer_submit_write(name, iaddr, taddr + 200000, 4096)
    status, deadline = 0, time.monotonic() + 10
    while status == 0 and time.monotonic() < deadline:
        status = init.transfer_check_status(bid)
    out["submit_write"] = ["id" if bid > 0 else bid, status, target.read_bytes_from_buffer(taddr + 200000, 4096)
                           == data]
    data = fill(4096)
    rc = init.transfer_sync(name, iaddr, taddr + 300000, 4096, TransferOpcode.Write, TransferNotify("kv-17", "ready"))
    notes, deadline = [], time.monotonic() + 5
    while not notes and time.monotonic() < deadline:
        notes = [[n.name, n.msg] for n in target.get_notifies()]
    out["notify"] = [rc, notes, target.read_bytes_from_buffer(taddr + 300000, 4096) == data]
    out["bytes_helpers"] = [init.write_bytes_to_buffer(iaddr + 9, b"hello moonlet", 13),
                            init.read_bytes_from_buffer(iaddr + 9, 13) == b"hello moonlet"]
    managed = init.allocate_managed_buffer(1 << 16)
    out["managed"] = [managed != 0, init.free_managed_buffer(managed, 1 << 16) if managed else None]
    # failures: the codes, not the messages
    out["write_outside_registered"] = init.transfer_sync_write(name, iaddr, taddr + size + (1 << 30), 4096) < 0
    out["batch_length_mismatch"] = init.batch_transfer_sync_write(name, [iaddr], [taddr, taddr], [16]) < 0
    out["unknown_segment"] = init.transfer_sync_write("127.0.0.1:1", iaddr, taddr, 16) < 0
    out["unregister"] = [init.unregister_memory(iaddr), target.unregister_memory(taddr)]
    return out


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1] if len(sys.argv) > 1 else "moonlet")))
