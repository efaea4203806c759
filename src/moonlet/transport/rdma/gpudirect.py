"""GPUDirect RDMA: registering CUDA memory with the NIC so it reads and writes HBM itself.

Two kernel paths resolve a GPU virtual address to pages the NIC can reach:

- **DMA-BUF**: CUDA exports the allocation's range as a dma-buf fd
  (``cuMemGetHandleForAddressRange``) and the NIC registers that fd
  (``ibv_reg_dmabuf_mr`` with the user's address as IOVA).  Needs Linux 5.12+,
  the open NVIDIA kernel modules and a NIC driver with dma-buf support.
- **nvidia-peermem**: with that kernel module loaded, a plain ``ibv_reg_mr`` on
  the device pointer works.

``rdma_gpu`` in the config picks one ("dmabuf", "peermem"), "auto" (DMA-BUF
first, then peermem; the first path that works is kept) or "off".
"""

from __future__ import annotations

import functools
import os

from ... import gpu
from ...errors import MoonletError
from ...sysfs import read
from . import verbs

PAGE = 4096
MODES = ("auto", "dmabuf", "peermem", "off")


class GpuRegistrationError(MoonletError):
    """GPU memory could not be registered with a NIC; the message says what was tried."""


def peermem_loaded() -> bool:
    return os.path.isdir("/sys/module/nvidia_peermem") or os.path.isdir("/sys/module/nv_peer_mem")


class GpuRegistration:
    """Registers CUDA memory with a NIC by the configured path, remembering the first one that works."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.works = ""  # the path that succeeded first ("dmabuf" / "peermem"), once known

    def register(self, ctx: verbs.Context, addr: int, length: int, access: int) -> verbs.MemoryRegion:
        if self.mode == "off":
            raise GpuRegistrationError("GPU memory registration is off (config rdma_gpu='off')")
        if not gpu.available():
            raise GpuRegistrationError(f"CUDA is not usable here: {gpu.unavailable_reason()}")
        paths = [self.works] if self.works else (["dmabuf", "peermem"] if self.mode == "auto" else [self.mode])
        errors = []
        for path in paths:
            try:
                mr = self._dmabuf(ctx, addr, length, access) if path == "dmabuf" else ctx.reg_mr(addr, length, access)
            except (verbs.VerbsError, gpu.GpuError) as e:
                errors.append(f"{path}: {e}")
                continue
            self.works = path
            return mr
        hint = "" if peermem_loaded() else " (nvidia-peermem is not loaded)"
        raise GpuRegistrationError("cannot register GPU memory with the NIC: " + "; ".join(errors) + hint)

    @staticmethod
    def _dmabuf(ctx: verbs.Context, addr: int, length: int, access: int) -> verbs.MemoryRegion:
        fd, start = export(addr)
        try:
            return ctx.reg_dmabuf_mr(addr - start, length, addr, fd, access)
        finally:
            os.close(fd)


def export(addr: int) -> tuple[int, int]:
    """A DMA-BUF fd for the whole CUDA allocation holding ``addr`` (page-aligned), and where that range starts.

    The NIC registers ``[addr, +length)`` as the fd's slice at offset ``addr - start``.
    """
    info = gpu.pointer_info(addr)
    if info is None:
        raise gpu.GpuError(f"{addr:#x} is not CUDA memory")
    start = info.base - info.base % PAGE
    end = -(-(info.base + info.size) // PAGE) * PAGE
    return gpu.dmabuf_fd(start, end - start), start


@functools.cache
def gpu_topology(location: str) -> tuple[str, int]:
    """(sysfs PCI path, NUMA node) of the GPU at ``location`` (``cuda:N``), or ("", -1)."""
    if not location.startswith("cuda:") or not gpu.available():
        return "", -1
    try:
        dev = next(d for d in gpu.describe()["devices"] if f"cuda:{d['ordinal']}" == location)
    except (StopIteration, gpu.GpuError):
        return "", -1
    bus = str(dev["pci"]).lower()
    path = f"/sys/bus/pci/devices/{bus}"
    numa = read(f"{path}/numa_node")
    return (os.path.realpath(path) if os.path.exists(path) else "",
            int(numa) if numa.lstrip("-").isdigit() else -1)
