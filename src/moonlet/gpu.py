"""CUDA through cuda-python's driver bindings (the optional ``moonlet[cuda]`` extra).

Everything here is lazy: importing moonlet never imports CUDA, and a machine
without a GPU or without cuda-python only learns so when it hands moonlet a
GPU pointer, with an error that says what to install.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from .errors import MoonletError


log = logging.getLogger("moonlet.gpu")


class GpuError(MoonletError):
    """A CUDA call failed, or CUDA support is not installed."""


_lock = threading.Lock()
_driver: Any = None
_init_error: str | None = None
_tls = threading.local()


def driver() -> Any:
    """The ``cuda.bindings.driver`` module, initialised; raise :class:`GpuError` if unusable."""
    global _driver, _init_error
    if _driver is not None:
        return _driver
    with _lock:
        if _driver is None and _init_error is None:
            try:
                from cuda.bindings import driver as d  # cuda-python >= 12.6
            except ImportError:
                try:
                    from cuda import cuda as d  # type: ignore[no-redef]  # older cuda-python
                except ImportError:
                    _init_error = "cuda-python is not installed: pip install 'moonlet[cuda]'"
                    d = None
            if d is not None:
                (err,) = d.cuInit(0)
                if err != d.CUresult.CUDA_SUCCESS:
                    _init_error = f"cuInit failed: {err.name} (no NVIDIA driver or GPU here?)"
                else:
                    _driver = d
    if _driver is None:
        raise GpuError(_init_error or "CUDA is unavailable")
    return _driver


def unavailable_reason() -> str:
    """Why :func:`available` is False (empty when it is True)."""
    try:
        driver()
        return ""
    except GpuError as e:
        return str(e)


def available() -> bool:
    """Whether CUDA is usable here (cuda-python installed and the driver initialises)."""
    try:
        driver()
        return True
    except GpuError:
        return False


def check(result: Any, what: str) -> Any:
    """Unpack a cuda-python ``(CUresult, *values)`` tuple; raise :class:`GpuError` naming ``what``."""
    d = driver()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != d.CUresult.CUDA_SUCCESS:
        _, name = d.cuGetErrorName(err)
        raise GpuError(f"{what} failed: {name.decode() if isinstance(name, bytes) else name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def device_count() -> int:
    return check(driver().cuDeviceGetCount(), "cuDeviceGetCount")


def device_uuid(ordinal: int) -> str:
    """The GPU's UUID: ordinals differ between processes (CUDA_VISIBLE_DEVICES), UUIDs do not."""
    d = driver()
    dev = check(d.cuDeviceGet(ordinal), f"cuDeviceGet({ordinal})")
    return bytes(check(d.cuDeviceGetUuid(dev), "cuDeviceGetUuid").bytes).hex()


def ordinal_of(uuid: str) -> int | None:
    """This process's ordinal for the GPU with ``uuid``, or None if it is not visible here."""
    for i in range(device_count()):
        if device_uuid(i) == uuid:
            return i
    return None


def use_device(ordinal: int) -> None:
    """Make ``ordinal``'s primary context current in this thread (cached per thread)."""
    ctxs = getattr(_tls, "ctxs", None)
    if ctxs is None:
        ctxs = _tls.ctxs = {}
    d = driver()
    if getattr(_tls, "current", None) == ordinal:
        return
    ctx = ctxs.get(ordinal)
    if ctx is None:
        dev = check(d.cuDeviceGet(ordinal), f"cuDeviceGet({ordinal})")
        ctx = ctxs[ordinal] = check(d.cuDevicePrimaryCtxRetain(dev), f"cuDevicePrimaryCtxRetain({ordinal})")
    check(d.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    _tls.current = ordinal


@dataclass(frozen=True)
class PointerInfo:
    """Where a pointer lives, as the CUDA driver sees it."""

    device: int  # GPU ordinal
    base: int  # start of the allocation holding the pointer
    size: int  # size of that allocation


def pointer_info(ptr: int) -> PointerInfo | None:
    """CUDA's view of ``ptr``: its GPU and allocation, or None for memory CUDA does not know as device memory."""
    d = driver()
    A = d.CUpointer_attribute
    attrs = [A.CU_POINTER_ATTRIBUTE_MEMORY_TYPE, A.CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
             A.CU_POINTER_ATTRIBUTE_RANGE_START_ADDR, A.CU_POINTER_ATTRIBUTE_RANGE_SIZE]
    err, values = d.cuPointerGetAttributes(len(attrs), attrs, ptr)
    if err != d.CUresult.CUDA_SUCCESS:
        return None
    mem_type, ordinal, base, size = values
    if int(mem_type) != int(d.CUmemorytype.CU_MEMORYTYPE_DEVICE):
        return None
    return PointerInfo(int(ordinal), int(base), int(size))


def cuda_array(obj: Any) -> tuple[int, int, int] | None:
    """``(address, nbytes, device)`` of a GPU tensor (``__cuda_array_interface__``), or None."""
    iface = getattr(obj, "__cuda_array_interface__", None)
    if iface is None:
        return None
    shape, typestr, strides = iface["shape"], iface["typestr"], iface.get("strides")
    itemsize = int(typestr[2:])
    count = 1
    for n in shape:
        count *= n
    if strides is not None:  # contiguous C order is the only layout a byte range can describe
        expect = itemsize
        for n, s in zip(reversed(shape), reversed(strides)):
            if n > 1 and s != expect:
                raise GpuError("cannot register a non-contiguous GPU tensor; call .contiguous() first")
            expect *= n
    addr = int(iface["data"][0])
    info = pointer_info(addr)
    if info is None:
        raise GpuError(f"{type(obj).__name__} at {addr:#x} is not CUDA device memory")
    return addr, count * itemsize, info.device


def ipc_handle(base: int) -> bytes:
    """The 64-byte CUDA IPC handle of the allocation starting at ``base``."""
    handle = check(driver().cuIpcGetMemHandle(base), "cuIpcGetMemHandle")
    return bytes(handle.reserved)


def ipc_open(handle: bytes, device: int) -> int:
    """Map a peer's allocation into this process on ``device``; return its base address here."""
    d = driver()
    use_device(device)
    h = d.CUipcMemHandle()
    h.reserved = handle
    ptr = check(d.cuIpcOpenMemHandle(h, d.CUipcMem_flags.CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS), "cuIpcOpenMemHandle")
    return int(ptr)


def ipc_close(ptr: int, device: int) -> None:
    use_device(device)
    check(driver().cuIpcCloseMemHandle(ptr), "cuIpcCloseMemHandle")


def pin_host(addr: int, length: int) -> None:
    """Page-lock host memory so GPU copies to and from it run at full speed and asynchronously."""
    d = driver()
    use_device(0)
    check(d.cuMemHostRegister(addr, length, d.CU_MEMHOSTREGISTER_PORTABLE), "cuMemHostRegister")


def unpin_host(addr: int) -> None:
    check(driver().cuMemHostUnregister(addr), "cuMemHostUnregister")


class Stream:
    """A non-blocking stream on one GPU, with an event to know when its copies are done."""

    def __init__(self, device: int) -> None:
        d = driver()
        use_device(device)
        self.device = device
        self.handle = check(d.cuStreamCreate(d.CUstream_flags.CU_STREAM_NON_BLOCKING), "cuStreamCreate")
        self._batch = hasattr(d, "cuMemcpyBatchAsync")

    def copy(self, copies: list[tuple[int, int, int]]) -> None:
        """Queue ``(dst, src, nbytes)`` copies: one batched call where the driver has it."""
        d = driver()
        use_device(self.device)
        if len(copies) > 1 and self._batch:
            attr = d.CUmemcpyAttributes()
            attr.srcAccessOrder = d.CUmemcpySrcAccessOrder.CU_MEMCPY_SRC_ACCESS_ORDER_STREAM
            ptr = d.CUdeviceptr
            dsts = [ptr(c[0]) for c in copies]
            srcs = [ptr(c[1]) for c in copies]
            try:
                check(d.cuMemcpyBatchAsync(dsts, srcs, [c[2] for c in copies], len(copies), [attr], [0], 1,
                                           self.handle), "cuMemcpyBatchAsync")
                return
            except (GpuError, TypeError) as e:  # e.g. an older driver: one call per copy from now on
                self._batch = False
                log.info("cuMemcpyBatchAsync unusable (%s); copying one call per request", e)
        for dst, src, n in copies:
            check(d.cuMemcpyAsync(dst, src, n, self.handle), "cuMemcpyAsync")

    def record(self) -> Any:
        d = driver()
        use_device(self.device)
        event = check(d.cuEventCreate(d.CUevent_flags.CU_EVENT_DISABLE_TIMING), "cuEventCreate")
        check(d.cuEventRecord(event, self.handle), "cuEventRecord")
        return event

    def synchronize(self) -> None:
        use_device(self.device)
        check(driver().cuStreamSynchronize(self.handle), "cuStreamSynchronize")


def event_done(event: Any, block: bool) -> bool:
    """Whether the copies before ``event`` finished (waiting for them if ``block``); destroys it when done."""
    d = driver()
    if block:
        check(d.cuEventSynchronize(event), "cuEventSynchronize")
    else:
        (err,) = d.cuEventQuery(event)
        if err == d.CUresult.CUDA_ERROR_NOT_READY:
            return False
        check((err,), "cuEventQuery")
    check(d.cuEventDestroy(event), "cuEventDestroy")
    return True


def alloc(device: int, nbytes: int) -> int:
    """``cuMemAlloc`` on ``device`` (benchmarks and tests; users bring their own tensors)."""
    use_device(device)
    return int(check(driver().cuMemAlloc(nbytes), "cuMemAlloc"))


def free(ptr: int, device: int) -> None:
    use_device(device)
    check(driver().cuMemFree(ptr), "cuMemFree")


def memcpy(dst: int, src: int, nbytes: int, device: int) -> None:
    """A synchronous copy between any two pointers CUDA can address (host pointers included)."""
    use_device(device)
    check(driver().cuMemcpy(dst, src, nbytes), "cuMemcpy")


def _sysfs(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def describe() -> dict:
    """GPUs, their NUMA node and PCIe bus, peer access between them, and GPUDirect RDMA paths.

    ``moonlet info`` prints this: it answers "can this host register GPU memory
    with an RDMA NIC, and how?", which users ask most.
    """
    out: dict = {"available": available(), "reason": unavailable_reason(), "devices": [], "peer_access": {},
                 "gpudirect": {}}
    peermem = _sysfs("/sys/kernel/mm/memory_peers/nv_mem/version") or (
        "loaded" if "nvidia_peermem" in _sysfs("/proc/modules") else "")
    out["gpudirect"]["nvidia_peermem"] = (
        f"yes ({peermem})" if peermem else
        "no: the nvidia_peermem module is not loaded (modprobe nvidia-peermem, shipped with the NVIDIA driver)")
    if not out["available"]:
        out["gpudirect"]["dma_buf"] = f"unknown: {out['reason']}"
        return out
    d = driver()
    n = device_count()
    for i in range(n):
        dev = check(d.cuDeviceGet(i), "cuDeviceGet")
        name = check(d.cuDeviceGetName(64, dev), "cuDeviceGetName")
        bus = check(d.cuDeviceGetPCIBusId(32, dev), "cuDeviceGetPCIBusId")
        name = name.split(b"\0")[0].decode() if isinstance(name, bytes) else str(name)
        bus = bus.split(b"\0")[0].decode() if isinstance(bus, bytes) else str(bus)
        mem = check(d.cuDeviceTotalMem(dev), "cuDeviceTotalMem")
        numa = _sysfs(f"/sys/bus/pci/devices/{bus.lower()}/numa_node") or "?"
        out["devices"].append({"ordinal": i, "name": name, "uuid": device_uuid(i), "pci": bus,
                               "numa": numa, "memory_gib": round(int(mem) / 2**30, 1)})
    for i in range(n):
        for j in range(n):
            if i != j:
                out["peer_access"][f"{i}->{j}"] = bool(check(d.cuDeviceCanAccessPeer(i, j), "cuDeviceCanAccessPeer"))
    out["gpudirect"]["dma_buf"] = _dma_buf_check(0) if n else "no GPU"
    return out


def _dma_buf_check(device: int) -> str:
    d = driver()
    dev = check(d.cuDeviceGet(device), "cuDeviceGet")
    attr = d.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED
    if not check(d.cuDeviceGetAttribute(attr, dev), "cuDeviceGetAttribute"):
        return "no: the driver reports CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED = 0 (needs a 5.12+ kernel and open GPU modules)"
    ptr = alloc(device, 2 << 20)
    try:
        fd = check(d.cuMemGetHandleForAddressRange(
            ptr, 2 << 20, d.CUmemRangeHandleType.CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD, 0), "cuMemGetHandleForAddressRange")
        import os

        os.close(int(fd))
        return "yes: exported a DMA-BUF fd for a 2 MiB allocation (ibv_reg_dmabuf_mr can register GPU memory)"
    except GpuError as e:
        return f"no: {e}"
    finally:
        free(ptr, device)
