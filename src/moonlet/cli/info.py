"""``moonlet info``: what this host offers a transfer engine, and what it lacks and why."""

from __future__ import annotations

import os
import platform
import sys

from .. import __version__, gpu
from ..config import DEFAULT, ENVIRONMENT, NOT_FROM_ENV, env_name, resolve
from ..engine import available_transports
from ..errors import MoonletError
from ..segment import host_identity
from ..sysfs import read as _read
from ..transport.rdma import gpudirect, verbs
from ..transport.rdma import nic as rdma_nic
from ..transport.shm import cma


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


def _rdma() -> tuple[list[str], str]:
    """Usable RDMA NICs (device, port, GID index, MTU, NUMA), and why there are none when there are none."""
    try:
        nics, why = rdma_nic.discover()
    except MoonletError as e:
        return [], str(e)
    out = [f"{n.name} port {n.port}: GID index {n.gid_index} ({_gid(n.gid)}), MTU {verbs.MTU_BYTES.get(n.mtu, '?')}, "
           f"NUMA {n.numa if n.numa >= 0 else '?'}" for n in nics]
    for n in nics:
        n.ctx.close()  # type: ignore[union-attr]
    return out, why


def _gid(raw: bytes) -> str:
    if raw.startswith(rdma_nic.V4_MAPPED):
        return "IPv4 " + ".".join(str(b) for b in raw[12:])
    return ":".join(raw[i:i + 2].hex() for i in range(0, 16, 2))


def collect() -> dict:
    """Everything ``moonlet info`` prints, as a dict (also used by tests and benchmarks)."""
    rdma = _rdma()
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
        "rdma_devices": rdma[0],
        "rdma_reason": rdma[1],
        "same_host": dict(zip(("works", "detail"), cma.probe())),
        "gpu": gpu.describe(),
        "transports": list(available_transports()),
    }


def configuration() -> list[tuple[str, str, str]]:
    """(field, value, source) of the configuration an engine started here without ``config=`` gets: each
    EngineConfig field with its value and where a non-default value comes from (``MOONLET_<FIELD>``), then
    whether ``$MOONLET_SECRET`` provides the cluster secret (never its value). A bad variable raises
    :class:`~moonlet.errors.ConfigError` naming it."""
    cfg, sources = resolve()
    where = {name: f"environment {env_name(name)}" if source == ENVIRONMENT else source
             for name, source in sources.items()}
    out = []
    for name in sources:
        if name in NOT_FROM_ENV:
            continue
        value = getattr(cfg, name)
        shown = ",".join(value) if isinstance(value, tuple) else "" if value is None else str(value)
        out.append((name, shown or "-", where[name]))
    secret_env = bool(os.environ.get("MOONLET_SECRET"))
    if cfg.secret_file:
        out.append(("secret", f"from the file {cfg.secret_file}", where["secret_file"]))
    else:
        out.append(("secret", "set (hidden)" if secret_env else "NONE: any process that reaches an engine may use "
                    "its memory", "environment MOONLET_SECRET" if secret_env else DEFAULT))
    return out


def _gpudirect_verdict(info: dict) -> str:
    """Which path the RDMA transport would use to register GPU memory here, or why none works."""
    g = info["gpu"]
    if not info["rdma_devices"]:
        return "none: no usable RDMA NIC"
    if not g["available"]:
        return f"none: no usable GPU ({g['reason']})"
    if g["gpudirect"]["dma_buf"].startswith("yes"):
        return "DMA-BUF (ibv_reg_dmabuf_mr), tried first"
    if gpudirect.peermem_loaded():
        return "nvidia-peermem (ibv_reg_mr on device pointers)"
    return "none: DMA-BUF export fails and nvidia-peermem is not loaded; GPU memory goes over TCP, staged"


def main(_args: object = None) -> int:
    config = configuration()  # first: a bad MOONLET_ variable is the one error
    info = collect()
    print(f"moonlet {info['moonlet']} on Python {info['python']} ({info['platform']})")
    print(f"host id      {info['host_id']}")
    print(f"cpus         {info['cpus']}, NUMA nodes: {', '.join(info['numa_nodes'])}")
    print(f"transports   {', '.join(info['transports'])}")
    sh = info["same_host"]
    print(f"same-host    {'works' if sh['works'] else 'NOT available'}: {sh['detail']}")
    print("NICs         " + ("\n             ".join(info["nics"]) or "none besides loopback"))
    print("RDMA NICs    " + ("\n             ".join(info["rdma_devices"]) or f"none usable: {info['rdma_reason']}"))
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
    print("             RDMA registration of GPU memory: " + _gpudirect_verdict(info))
    width = max(len(name) for name, _, _ in config)
    print("configuration (EngineConfig fields; MOONLET_<FIELD> sets one)")
    for name, value, source in config:
        print(f"  {name:<{width}}  {value}" + ("" if source == DEFAULT else f"  ({source})"))
    return 0
