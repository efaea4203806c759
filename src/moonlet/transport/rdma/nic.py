"""RDMA NICs on this host: which are usable, how to address them, and which suits which memory.

Discovery opens each device libibverbs lists, keeps the ports that are
ACTIVE, and picks a GID index per port (RoCE v2 with an IPv4-mapped address
first, then any RoCE v2, then any valid GID; index 0 on InfiniBand).

Topology: each memory location (``cpu:N``, ``cuda:N``) gets an ordered NIC
preference.  A JSON matrix (``{"cpu:0": ["mlx5_0"], "cuda:1": ["mlx5_2", "mlx5_3"]}``)
given in the config wins; otherwise NICs are ranked by PCIe distance to the GPU
(length of the shared sysfs device path) or by NUMA node, from sysfs.  The NICs
tied for best are striped over.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from ...errors import ConfigError
from ...sysfs import read
from . import verbs

SYSFS = "/sys/class/infiniband"
V4_MAPPED = bytes(10) + b"\xff\xff"  # the first 12 bytes of a GID that carries an IPv4 address


@dataclass
class Nic:
    """One active port of one RDMA device, as peers need to know it."""

    name: str
    port: int
    gid_index: int
    gid: bytes
    lid: int
    mtu: int  # enum ibv_mtu of the active MTU
    numa: int = -1
    pci_path: str = ""
    ctx: verbs.Context | None = field(default=None, repr=False)

    def describe(self) -> dict:
        """The JSON form published in the segment descriptor."""
        return {"name": self.name, "port": self.port, "gid": self.gid.hex(), "lid": self.lid, "mtu": self.mtu,
                "numa": self.numa}


def _gid_types(dev: str, port: int, indices: list[int]) -> dict[int, str]:
    """The RoCE type of each GID in ``indices`` (a port has hundreds of entries, mostly empty: read only these)."""
    base = f"{SYSFS}/{dev}/ports/{port}/gid_attrs/types"
    return {i: read(f"{base}/{i}") for i in indices}


def pick_gid_index(gids: dict[int, bytes], types: dict[int, str], ethernet: bool) -> int | None:
    """The GID index to use: on RoCE prefer v2 with an IPv4-mapped address, then v2, then any valid GID."""
    valid = {i: g for i, g in gids.items() if any(g)}
    if not ethernet:
        return 0 if 0 in valid else min(valid, default=None)
    def rank(i: int) -> tuple:
        v2 = "v2" in types.get(i, "").lower()
        return (not v2, not valid[i].startswith(V4_MAPPED), i)

    return min(valid, key=rank, default=None)


def discover(devices: tuple[str, ...] = (), gid_index: int | None = None) -> tuple[list[Nic], str]:
    """Open the usable NICs (all active ones, or those named); returns them and why others were left out."""
    why = verbs.unavailable_reason()
    if why:
        return [], why
    names = verbs.device_names()
    missing = [d for d in devices if d not in names]
    if missing:
        raise ConfigError(f"RDMA device(s) {missing} not found; present: {names}")
    nics: list[Nic] = []
    notes = []
    for name in devices or tuple(names):
        try:
            ctx = verbs.Context(name)
        except verbs.VerbsError as e:
            notes.append(f"{name}: {e}")
            continue
        for port in range(1, ctx.ports + 1):
            attr = ctx.port(port)
            if attr["state"] != verbs.PORT_ACTIVE:
                notes.append(f"{name} port {port}: not active")
                continue
            ethernet = attr["link_layer"] == verbs.LINK_LAYER_ETHERNET
            index: int | None
            if gid_index is not None:
                index = gid_index
            else:
                gids = {}
                for i in range(min(attr["gid_tbl_len"], 32)):
                    try:
                        gids[i] = ctx.gid(port, i)
                    except verbs.VerbsError:
                        continue
                index = pick_gid_index(gids, _gid_types(name, port, [i for i, g in gids.items() if any(g)]),
                                       ethernet)
                if index is None:
                    notes.append(f"{name} port {port}: no valid GID")
                    continue
            numa = read(f"{SYSFS}/{name}/device/numa_node")
            path = os.path.realpath(f"{SYSFS}/{name}/device") if os.path.exists(f"{SYSFS}/{name}/device") else ""
            nics.append(Nic(name, port, index, ctx.gid(port, index), attr["lid"], attr["active_mtu"],
                            int(numa) if numa.lstrip("-").isdigit() else -1, path, ctx))
            break  # one port per device
        else:
            ctx.close()
    return nics, "; ".join(notes) if not nics else ""


def load_matrix(spec: str | None) -> dict[str, list[str]]:
    """The NIC preference matrix from JSON text or a JSON file path (empty when ``spec`` is None)."""
    if not spec:
        return {}
    try:
        text = spec if spec.lstrip().startswith("{") else open(spec).read()
        matrix = json.loads(text)
        if not isinstance(matrix, dict) or not all(
                isinstance(v, list) and all(isinstance(n, str) for n in v) for v in matrix.values()):
            raise ValueError("expected an object mapping locations to lists of NIC names")
        return matrix
    except (OSError, ValueError) as e:
        raise ConfigError(f"rdma_nic_matrix {spec!r}: {e}") from None


def _shared_path(a: str, b: str) -> int:
    """How many sysfs path components two devices share (more = closer on PCIe)."""
    n = 0
    for x, y in zip(a.split("/"), b.split("/")):
        if x != y:
            break
        n += 1
    return n


def tiers(location: str, nics: list[Nic], matrix: dict[str, list[str]],
          gpu_path: str = "", gpu_numa: int = -1) -> list[list[Nic]]:
    """``nics`` grouped best-first for memory at ``location``: a large request is striped over the first group.

    A matrix entry puts the NICs it names (together) first; otherwise NICs
    sharing more of the GPU's PCIe path, then its (or the CPU memory's) NUMA
    node, come first.
    """
    if location in matrix:
        named = [n for name in matrix[location] for n in nics if n.name == name]
        if named:
            rest = [n for n in nics if n not in named]
            return [named] + ([rest] if rest else [])
    kind, _, idx = location.partition(":")
    node = gpu_numa if kind == "cuda" else (int(idx) if idx.isdigit() else -1)

    def key(n: Nic) -> tuple:
        near = -_shared_path(gpu_path, n.pci_path) if kind == "cuda" and gpu_path else 0
        return (near, n.numa != node)

    groups: dict[tuple, list[Nic]] = {}
    for n in sorted(nics, key=key):
        groups.setdefault(key(n), []).append(n)
    return list(groups.values())
