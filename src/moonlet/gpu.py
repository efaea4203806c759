"""CUDA through cuda-python's driver bindings (the optional ``moonlet[cuda]`` extra).

Everything here is lazy: importing moonlet never imports CUDA, and a machine
without a GPU or without cuda-python only learns so when it hands moonlet a
GPU pointer, with an error that says what to install.
"""

from __future__ import annotations

import array
import bisect
import ctypes
import logging
import threading
from dataclasses import dataclass
from typing import Any

from .errors import MoonletError
from .sysfs import read as _sysfs

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
                    from cuda import cuda as d  # older cuda-python
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
    """Make ``ordinal``'s primary context current in this thread (the context handle is cached)."""
    ctxs = getattr(_tls, "ctxs", None)
    if ctxs is None:
        ctxs = _tls.ctxs = {}
    d = driver()
    ctx = ctxs.get(ordinal)
    if ctx is None:
        dev = check(d.cuDeviceGet(ordinal), f"cuDeviceGet({ordinal})")
        ctx = ctxs[ordinal] = check(d.cuDevicePrimaryCtxRetain(dev), f"cuDevicePrimaryCtxRetain({ordinal})")
    # Set every time: other libraries (torch's cudaSetDevice) switch this thread's context behind our back.
    check(d.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")


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


_GATHER_SOURCE = r"""
#define MAX_ENTRIES %d
struct Table { unsigned long long dst[MAX_ENTRIES]; unsigned long long src[MAX_ENTRIES];
               unsigned int size[MAX_ENTRIES]; int n; };
// Block (x, y) copies part y of entry x: 16-byte loads and stores when both ends are aligned.
extern "C" __global__ void gather_copy(const Table t) {
    const int e = blockIdx.x;
    if (e >= t.n) return;
    const unsigned long long len = t.size[e];
    char* d = (char*)t.dst[e];
    const char* s = (const char*)t.src[e];
    const unsigned long long stride = (unsigned long long)gridDim.y * blockDim.x;
    const unsigned long long first = (unsigned long long)blockIdx.y * blockDim.x + threadIdx.x;
    unsigned long long done = 0;
    if (((t.dst[e] | t.src[e]) & 15) == 0) {
        const unsigned long long n16 = len / 16;
        uint4* d4 = (uint4*)d;
        const uint4* s4 = (const uint4*)s;
        unsigned long long i = first;
        for (; i + 3 * stride < n16; i += 4 * stride) {  // four loads in flight per thread
            uint4 a = s4[i], b = s4[i + stride], c = s4[i + 2 * stride], f = s4[i + 3 * stride];
            d4[i] = a; d4[i + stride] = b; d4[i + 2 * stride] = c; d4[i + 3 * stride] = f;
        }
        for (; i < n16; i += stride) d4[i] = s4[i];
        done = n16 * 16;
    }
    for (unsigned long long i = done + first; i < len; i += stride) d[i] = s[i];
}
"""
KERNEL_ENTRIES = 128  # entries per launch: the table travels as a kernel parameter (< 4 KiB)


class _Table(ctypes.Structure):
    _fields_ = [("dst", ctypes.c_uint64 * KERNEL_ENTRIES), ("src", ctypes.c_uint64 * KERNEL_ENTRIES),
                ("size", ctypes.c_uint32 * KERNEL_ENTRIES), ("n", ctypes.c_int32)]


_kernels: dict[int, Any] = {}


def _gather_kernel(device: int) -> Any:
    """The gather-copy kernel for ``device``, compiled once with NVRTC for its architecture."""
    fn = _kernels.get(device)
    if fn is not None:
        return fn
    from cuda.bindings import nvrtc

    d = driver()
    dev = check(d.cuDeviceGet(device), "cuDeviceGet")
    A = d.CUdevice_attribute
    major = check(d.cuDeviceGetAttribute(A.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev), "cuDeviceGetAttribute")
    minor = check(d.cuDeviceGetAttribute(A.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev), "cuDeviceGetAttribute")
    err, prog = nvrtc.nvrtcCreateProgram((_GATHER_SOURCE % KERNEL_ENTRIES).encode(), b"gather.cu", 0, [], [])
    opts = [f"--gpu-architecture=sm_{major}{minor}".encode()]
    (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, size = nvrtc.nvrtcGetProgramLogSize(prog)
        text = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, text)
        raise GpuError(f"compiling the gather-copy kernel failed: {text.decode(errors='replace')}")
    _, size = nvrtc.nvrtcGetCUBINSize(prog)
    cubin = b" " * size
    nvrtc.nvrtcGetCUBIN(prog, cubin)
    use_device(device)
    module = check(d.cuModuleLoadData(cubin), "cuModuleLoadData")
    fn = _kernels[device] = check(d.cuModuleGetFunction(module, b"gather_copy"), "cuModuleGetFunction")
    return fn


class Stream:
    """A non-blocking stream on one GPU, with an event to know when its copies are done.

    ``kernel_max_block``: a batch of several copies whose blocks average at most
    this many bytes goes through one gather-copy kernel launch instead of the
    copy engines (much faster for small scattered blocks over NVLink, but it
    borrows SMs from the user's kernels); 0 never uses the kernel.
    """

    def __init__(self, device: int, kernel_max_block: int = 0) -> None:
        d = driver()
        use_device(device)
        self.device = device
        self.handle = check(d.cuStreamCreate(d.CUstream_flags.CU_STREAM_NON_BLOCKING), "cuStreamCreate")
        self._batch = hasattr(d, "cuMemcpyBatchAsync")
        self._kernel_max = kernel_max_block
        #: bytes of one entry that one thread block of the gather kernel copies (256 threads, 64 B each:
        #: enough blocks per SM to hide memory latency, benchmarks/gpu_profile.py measures the choice)
        self.kernel_chunk = 16 << 10

    def _launch(self, dsts: list[int], srcs: list[int], sizes: list[int]) -> None:
        d = driver()
        fn = _gather_kernel(self.device)
        for i in range(0, len(sizes), KERNEL_ENTRIES):
            k = min(KERNEL_ENTRIES, len(sizes) - i)
            table = _Table()
            base = ctypes.addressof(table)
            for offset, code, column in ((_Table.dst.offset, "Q", dsts), (_Table.src.offset, "Q", srcs),
                                         (_Table.size.offset, "I", sizes)):
                packed = array.array(code, column[i:i + k])  # one C loop, not a Python one per entry
                ctypes.memmove(base + offset, packed.buffer_info()[0], k * packed.itemsize)
            table.n = k
            parts = max(1, min(64, max(sizes[i:i + k]) // self.kernel_chunk))
            params = (ctypes.c_void_p * 1)(base)
            check(d.cuLaunchKernel(fn, k, parts, 1, 256, 1, 1, 0, self.handle, ctypes.addressof(params), 0),
                  "cuLaunchKernel(gather_copy)")

    def copy(self, copies: list[tuple[int, int, int]], device_only: bool = False, record: bool = False) -> Any:
        """Queue ``(dst, src, nbytes)`` copies: one kernel launch, one batched call, or one call each.

        ``device_only`` says every pointer is GPU memory (the kernel needs that).
        With ``record``, returns an event that fires when they are done (see :func:`event_done`).
        """
        dsts, srcs, sizes = (list(column) for column in zip(*copies)) if copies else ([], [], [])
        return self.copy_columns(dsts, srcs, sizes, device_only, record)

    def copy_columns(self, dsts: list[int], srcs: list[int], sizes: list[int], device_only: bool = False,
                     record: bool = False) -> Any:
        """:meth:`copy` with the copies as three parallel lists (what array submits already hold)."""
        use_device(self.device)
        if sizes:
            self._queue(dsts, srcs, sizes, device_only)
        return self._record() if record else None

    def _queue(self, dsts: list[int], srcs: list[int], sizes: list[int], device_only: bool) -> None:
        d = driver()
        n = len(sizes)
        if device_only and n > 1 and self._kernel_max and sum(sizes) <= self._kernel_max * n \
                and max(sizes) < 1 << 32:
            try:
                self._launch(dsts, srcs, sizes)
                return
            except GpuError as e:
                self._kernel_max = 0
                log.warning("gather-copy kernel unusable (%s); using the copy engines", e)
        if n > 1 and self._batch:
            attr = d.CUmemcpyAttributes()
            attr.srcAccessOrder = d.CUmemcpySrcAccessOrder.CU_MEMCPY_SRC_ACCESS_ORDER_STREAM
            ptr = d.CUdeviceptr
            try:
                check(d.cuMemcpyBatchAsync([ptr(x) for x in dsts], [ptr(x) for x in srcs], sizes, n, [attr], [0], 1,
                                           self.handle), "cuMemcpyBatchAsync")
                return
            except (GpuError, TypeError) as e:  # e.g. an older driver: one call per copy from now on
                self._batch = False
                log.info("cuMemcpyBatchAsync unusable (%s); copying one call per request", e)
        for dst, src, size in zip(dsts, srcs, sizes):
            check(d.cuMemcpyAsync(dst, src, size, self.handle), "cuMemcpyAsync")

    def record(self) -> Any:
        """An event that fires when the copies queued so far are done (see :func:`event_done`)."""
        use_device(self.device)
        return self._record()

    def _record(self) -> _Event:
        d = driver()
        free = _free_events.setdefault(self.device, [])
        try:
            event = free.pop()
        except IndexError:  # events are reused: creating and destroying one per batch costs a few us each
            event = _Event(check(d.cuEventCreate(d.CUevent_flags.CU_EVENT_DISABLE_TIMING), "cuEventCreate"),
                           self.device)
        check(d.cuEventRecord(event.handle, self.handle), "cuEventRecord")
        return event

    def synchronize(self) -> None:
        use_device(self.device)
        check(driver().cuStreamSynchronize(self.handle), "cuStreamSynchronize")


class _Event:
    """A CUDA event of a :class:`Stream`, recycled once it has fired."""

    __slots__ = ("handle", "device")

    def __init__(self, handle: Any, device: int) -> None:
        self.handle = handle
        self.device = device


_free_events: dict[int, list[_Event]] = {}  # per device: events that fired, ready to record again


def event_done(event: _Event, block: bool) -> bool:
    """Whether the copies before ``event`` finished (waiting for them if ``block``); the event is then
    recycled and must not be used again."""
    d = driver()
    if block:
        check(d.cuEventSynchronize(event.handle), "cuEventSynchronize")
    else:
        (err,) = d.cuEventQuery(event.handle)
        if err == d.CUresult.CUDA_ERROR_NOT_READY:
            return False
        check((err,), "cuEventQuery")
    _free_events.setdefault(event.device, []).append(event)
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


def dmabuf_fd(base: int, size: int) -> int:
    """A DMA-BUF file descriptor exporting ``[base, +size)`` of a CUDA allocation (for ``ibv_reg_dmabuf_mr``).

    ``base`` and ``size`` must be page aligned; the caller closes the fd.
    """
    d = driver()
    return int(check(d.cuMemGetHandleForAddressRange(
        base, size, d.CUmemRangeHandleType.CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD, 0), "cuMemGetHandleForAddressRange"))


def _dma_buf_check(device: int) -> str:
    d = driver()
    dev = check(d.cuDeviceGet(device), "cuDeviceGet")
    attr = d.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED
    if not check(d.cuDeviceGetAttribute(attr, dev), "cuDeviceGetAttribute"):
        return ("no: the driver reports CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED = 0 "
                "(needs a 5.12+ kernel and open GPU modules)")
    ptr = alloc(device, 2 << 20)
    try:
        import os

        os.close(dmabuf_fd(ptr, 2 << 20))
        return "yes: exported a DMA-BUF fd for a 2 MiB allocation (ibv_reg_dmabuf_mr can register GPU memory)"
    except GpuError as e:
        return f"no: {e}"
    finally:
        free(ptr, device)


class Stage:
    """Host bytes standing in for GPU ranges while they cross a socket (one frame's worth)."""

    def __init__(self, pool: StagingPool | None, token: tuple[int, int] | None, view: memoryview, addr: int,
                 ranges: list[tuple[int, int, int]]) -> None:
        self._pool = pool
        self._token = token
        self.view = view
        self.addr = addr
        self.ranges = ranges  # (gpu address, length, device) in the order their bytes sit here

    def views(self) -> list[memoryview]:
        """One view per range, back to back."""
        out, off = [], 0
        for _, n, _ in self.ranges:
            out.append(self.view[off:off + n])
            off += n
        return out

    def _copy(self, to_gpu: bool, keep: list[bool] | None, wait: bool = True) -> list:
        """Queue the copies on each device's staging stream; wait for them, or return their events."""
        by_device: dict[int, list[tuple[int, int, int]]] = {}
        off = 0
        for k, (addr, n, device) in enumerate(self.ranges):
            if keep is None or keep[k]:
                host = self.addr + off
                by_device.setdefault(device, []).append((addr, host, n) if to_gpu else (host, addr, n))
            off += n
        events = []
        for device, copies in by_device.items():
            stream = _staging_stream(device)
            event = stream.copy(copies, record=not wait)
            if wait:
                stream.synchronize()
            else:
                events.append(event)
        return events

    def to_host(self) -> None:
        """Copy every GPU range into this stage (before its bytes are sent)."""
        self._copy(False, None)

    def start_to_host(self) -> list:
        """Start copying every GPU range into this stage; wait on the returned events before sending."""
        return self._copy(False, None, wait=False)

    def to_gpu(self, keep: list[bool] | None = None) -> None:
        """Copy this stage's bytes into the GPU ranges (those ``keep`` marks), after they were received."""
        self._copy(True, keep)

    def release(self) -> None:
        """Give the stretch back (once); the views must not be used afterwards."""
        if self._pool is not None and self._token is not None:
            self._pool.give(self._token)
            self._token = None


class StagingPool:
    """A page-locked host arena for moving GPU memory through sockets.

    Each frame takes a stretch of it (first fit, 4 KiB granules) and gives it
    back when its bytes have moved. A frame that finds no room gets a
    temporary unpinned buffer: slower, never blocked.
    """

    GRANULE = 4096

    def __init__(self, size: int) -> None:
        import mmap

        self.size = size
        self._mem = mmap.mmap(-1, size)
        self._view = memoryview(self._mem)
        self._base = ctypes.addressof(ctypes.c_char.from_buffer(self._mem))
        self._pinned = False
        try:
            pin_host(self._base, size)
            self._pinned = True
        except GpuError as e:
            log.info("staging pool not pinned: %s", e)
        self._free: list[tuple[int, int]] = [(0, size)]  # (offset, size), sorted by offset
        self._lock = threading.Lock()

    def take(self, ranges: list[tuple[int, int, int]]) -> Stage:
        """A stage for ``ranges`` ((gpu address, length, device) each)."""
        nbytes = sum(r[1] for r in ranges)
        want = -(-max(nbytes, 1) // self.GRANULE) * self.GRANULE
        with self._lock:
            for i, (off, size) in enumerate(self._free):
                if size >= want:
                    if size == want:
                        del self._free[i]
                    else:
                        self._free[i] = (off + want, size - want)
                    return Stage(self, (off, want), self._view[off:off + nbytes], self._base + off, ranges)
        scratch = bytearray(max(nbytes, 1))
        return Stage(None, None, memoryview(scratch), ctypes.addressof(ctypes.c_char.from_buffer(scratch)), ranges)

    def give(self, token: tuple[int, int]) -> None:
        """Return a stretch; merge it with free neighbours."""
        off, size = token
        with self._lock:
            free = self._free
            i = bisect.bisect(free, (off, size))
            free.insert(i, (off, size))
            if i + 1 < len(free) and off + size == free[i + 1][0]:
                free[i] = (off, size + free[i + 1][1])
                del free[i + 1]
            if i > 0 and free[i - 1][0] + free[i - 1][1] == off:
                free[i - 1] = (free[i - 1][0], free[i - 1][1] + free[i][1])
                del free[i]

    def close(self) -> None:
        """Unpin, then unmap. CUDA must forget the range first: a later mapping at the same address
        would otherwise be taken for this one, and copies would land in the old, unmapped pages."""
        if self._pinned:
            unpin_host(self._base)
            self._pinned = False
        self._view.release()
        try:
            self._mem.close()
        except BufferError:  # a stage is still referenced: leave it mapped (it is no longer pinned)
            log.info("staging pool still in use at close; left mapped")


_stage_streams: dict[int, Stream] = {}


def _staging_stream(device: int) -> Stream:
    stream = _stage_streams.get(device)
    if stream is None:
        with _lock:
            stream = _stage_streams.get(device) or _stage_streams.setdefault(device, Stream(device))
    return stream
