"""``moonlet info``: what this host offers a transfer engine, and what it lacks and why."""

from __future__ import annotations

import os
import platform
import sys

from .. import __version__
from ..segment import host_identity
from .. import gpu
from ..sysfs import read as _read
from ..transport import cma


def _nics() -> list[str]:
    out = []
    base = "/sys/class/net"
    for name in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        if name == "lo":
            continue
        speed = _read(f"{base}/{name}/speed")
        numa = _read(f"{base}/{name}/device/numa_node")
        state = _read(f"{base}/{name}/operstate")
        out.append(f"{name} state={state or '?'} speed={speed or '?'}Mb/s numa={numa or '?'}")
    return out


def _rdma() -> list[str]:
    base = "/sys/class/infiniband"
    if not os.path.isdir(base):
        return []
    return [f"{d} numa={_read(f'{base}/{d}/device/numa_node') or '?'}" for d in sorted(os.listdir(base))]


def collect() -> dict:
    """Everything ``moonlet info`` prints, as a dict (also used by tests and benchmarks)."""
    nodes = sorted(n for n in os.listdir("/sys/devices/system/node") if n.startswith("node")) \
        if os.path.isdir("/sys/devices/system/node") else []
    return {
        "moonlet": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host_id": host_identity(),
        "cpus": os.cpu_count(),
        "numa_nodes": nodes or ["node0"],
        "nics": _nics(),
        "rdma_devices": _rdma(),
        "same_host": dict(zip(("works", "detail"), cma.probe())),
        "gpu": gpu.describe(),
        "transports": ["local"] + (["cuda_ipc"] if gpu.available() else []) + (["shm"] if cma.AVAILABLE else [])
        + ["tcp"],
    }


def main(_args: object = None) -> int:
    info = collect()
    print(f"moonlet {info['moonlet']} on Python {info['python']} ({info['platform']})")
    print(f"host id      {info['host_id']}")
    print(f"cpus         {info['cpus']}, NUMA nodes: {', '.join(info['numa_nodes'])}")
    print(f"transports   {', '.join(info['transports'])}")
    sh = info["same_host"]
    print(f"same-host    {'works' if sh['works'] else 'NOT available'}: {sh['detail']}")
    print("NICs         " + ("\n             ".join(info["nics"]) or "none besides loopback"))
    print("RDMA devices " + ("\n             ".join(info["rdma_devices"])
                             or "none (no /sys/class/infiniband: no RDMA NIC or driver on this host)"))
    g = info["gpu"]
    if not g["available"]:
        print(f"GPUs         none usable: {g['reason']}")
    for dev in g["devices"]:
        print(f"GPU {dev['ordinal']}        {dev['name']}, {dev['memory_gib']} GiB, PCI {dev['pci']}, "
              f"NUMA {dev['numa']}, UUID {dev['uuid']}")
    if g["peer_access"]:
        print("GPU peers    " + ", ".join(f"{k}: {'P2P' if v else 'no P2P'}" for k, v in g["peer_access"].items()))
    print("GPUDirect    nvidia-peermem: " + g["gpudirect"]["nvidia_peermem"])
    print("             DMA-BUF: " + g["gpudirect"]["dma_buf"])
    return 0
