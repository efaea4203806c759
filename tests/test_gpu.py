"""GPU memory: registration, CUDA IPC between processes, GPU<->host. Runs only where CUDA works."""

from __future__ import annotations

import ctypes
import os

import pytest

from helpers.memory import sha
from moonlet import MemoryAccessError, Op, Request, State, TransferEngine, gpu

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not gpu.available(), reason=f"no usable CUDA here: {gpu.unavailable_reason()}")]

MiB = 1 << 20


def addr_of(buf: bytearray) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def to_gpu(ptr: int, data: bytearray, device: int) -> None:
    gpu.memcpy(ptr, addr_of(data), len(data), device)


def from_gpu(ptr: int, n: int, device: int) -> bytes:
    out = bytearray(n)
    gpu.memcpy(addr_of(out), ptr, n, device)
    return bytes(out)


def two_devices() -> list[tuple[int, int]]:
    """Same GPU, and two GPUs where there are two (collection runs before the skip applies)."""
    n = gpu.device_count() if gpu.available() else 1
    return [(0, 0)] + ([(0, 1)] if n > 1 else [])


def test_register_detects_location_and_allocation():
    with TransferEngine() as eng:
        ptr = gpu.alloc(0, 8 * MiB)
        try:
            buf = eng.register(ptr + MiB, 2 * MiB)  # a pointer into the middle of an allocation
            assert buf.location == "cuda:0" and not buf.is_host
            desc = eng.descriptor().buffers[0]
            assert desc["location"] == "cuda:0" and desc["ipc_base"] == ptr and len(desc["ipc"]) == 128
            with pytest.raises(MemoryAccessError, match="runs past its CUDA allocation"):
                eng.register(ptr + 7 * MiB, 2 * MiB)
            with pytest.raises(MemoryAccessError, match="CUDA says the memory is on cuda:0"):
                eng.register(ptr + 4 * MiB, MiB, location="cuda:1")
            host = eng.register(bytearray(4096))
            assert host.location.startswith("cpu:")
        finally:
            gpu.free(ptr, 0)


def test_register_torch_tensor():
    torch = pytest.importorskip("torch")
    t = torch.arange(1 << 20, dtype=torch.int32, device="cuda:0")
    with TransferEngine() as eng:
        buf = eng.register(t)
        assert buf.addr == t.data_ptr() and buf.length == t.numel() * 4 and buf.location == "cuda:0"
        with pytest.raises(Exception, match="non-contiguous"):
            eng.register(t.view(1024, 1024).t())


@pytest.mark.parametrize("kernel", [0, MiB], ids=["copy-engines", "gather-kernel"])
@pytest.mark.parametrize("mine,theirs", two_devices())
def test_gpu_to_gpu_across_processes(peer_factory, mine, theirs, kernel):
    target = peer_factory("--gpu", str(theirs), "--size", str(64 * MiB))
    with TransferEngine(gpu_kernel_max_block=kernel) as eng:
        ptr = gpu.alloc(mine, 64 * MiB)
        try:
            eng.register(ptr, 64 * MiB)
            seg = eng.open_segment(target.name)
            data = bytearray(os.urandom(8 * MiB))
            to_gpu(ptr, data, mine)
            # Scattered writes of random sizes, one batch.
            reqs = [Request(Op.WRITE, ptr + i * MiB, seg, target.addr + 3 + i * 2 * MiB, MiB - i * 4096)
                    for i in range(8)]
            statuses = engine_batch(eng, reqs)
            assert {s.transport for s in statuses} == {"cuda_ipc"}
            for r in reqs:
                assert target.digest(r.remote_addr, r.length) == sha(data[r.local_addr - ptr:r.local_addr - ptr
                                                                            + r.length])
            # Read them back into another part of local GPU memory and compare.
            back = [Request(Op.READ, ptr + 32 * MiB + i * MiB, seg, r.remote_addr, r.length)
                    for i, r in enumerate(reqs)]
            engine_batch(eng, back)
            for b, r in zip(back, reqs):
                assert from_gpu(b.local_addr, b.length, mine) == bytes(
                    data[r.local_addr - ptr:r.local_addr - ptr + r.length])
        finally:
            eng.close()
            gpu.free(ptr, mine)


@pytest.mark.parametrize("kernel", [0, MiB], ids=["copy-engines", "gather-kernel"])
def test_many_small_unaligned_blocks(peer_factory, kernel):
    target = peer_factory("--gpu", str(gpu.device_count() - 1), "--size", str(32 * MiB))
    with TransferEngine(gpu_kernel_max_block=kernel) as eng:
        ptr = gpu.alloc(0, 32 * MiB)
        try:
            eng.register(ptr, 32 * MiB)
            seg = eng.open_segment(target.name)
            data = bytearray(os.urandom(16 * MiB))
            to_gpu(ptr, data, 0)
            rng = __import__("random").Random(7)
            reqs = []
            for i in range(300):  # more than one kernel launch's worth of entries
                n = rng.randrange(1, 70000)
                lo, ro = i * 50000 + rng.randrange(0, 16), i * 100000 + rng.randrange(0, 16)
                reqs.append(Request(Op.WRITE, ptr + lo, seg, target.addr + ro, min(n, 49000)))
            engine_batch(eng, reqs)
            if kernel:
                assert gpu._kernels, "the gather-copy kernel did not run"
            for r in reqs[::17]:
                lo = r.local_addr - ptr
                assert target.digest(r.remote_addr, r.length) == sha(data[lo:lo + r.length])
            back = [Request(Op.READ, ptr + 16 * MiB + (r.local_addr - ptr), seg, r.remote_addr, r.length)
                    for r in reqs]
            engine_batch(eng, back)
            for b, r in list(zip(back, reqs))[::13]:
                lo = r.local_addr - ptr
                assert from_gpu(b.local_addr, b.length, 0) == bytes(data[lo:lo + r.length])
        finally:
            eng.close()
            gpu.free(ptr, 0)


def engine_batch(eng, reqs):
    statuses = eng.submit(reqs).wait()
    assert all(s.ok for s in statuses), [s.reason for s in statuses if not s.ok]
    return statuses


def test_host_to_gpu_and_back(peer_factory):
    target = peer_factory("--gpu", "0", "--size", str(16 * MiB))
    with TransferEngine() as eng:
        mem = bytearray(os.urandom(16 * MiB))
        buf = eng.register(mem)
        seg = eng.open_segment(target.name)
        st = eng.write(buf.addr, seg, target.addr, 16 * MiB)
        assert st.transport == "cuda_ipc"
        assert target.digest(target.addr, 16 * MiB) == sha(mem)
        mem[:] = bytes(16 * MiB)
        eng.read(buf.addr, seg, target.addr + 5, 4 * MiB)
        assert target.digest(target.addr + 5, 4 * MiB) == sha(mem[:4 * MiB])


def test_unregistered_gpu_buffer_is_not_reachable(peer_factory):
    target = peer_factory("--gpu", "0", "--size", str(4 * MiB))
    with TransferEngine() as eng:
        buf = eng.register(bytearray(4096))
        extra = target.call(f"register {2 * MiB}")["addr"]
        seg = eng.open_segment(target.name)
        eng.write(buf.addr, seg, extra, 4096)
        target.call(f"unregister {extra}")
        st = eng.submit([Request(Op.WRITE, buf.addr, seg, extra, 4096)]).wait()[0]
        assert st.state is State.FAILED and "not inside a registered buffer" in st.reason


def test_same_process_gpu_copy():
    with TransferEngine() as eng:
        ptr = gpu.alloc(0, 2 * MiB)
        try:
            g = eng.register(ptr, 2 * MiB)
            mem = bytearray(os.urandom(MiB))
            h = eng.register(mem)
            assert eng.write(h.addr, eng.name, g.addr + 17, MiB).transport == "local"
            assert from_gpu(g.addr + 17, MiB, 0) == bytes(mem)
        finally:
            eng.close()
            gpu.free(ptr, 0)


@pytest.mark.parametrize("local_gpu,remote_gpu", [(True, True), (True, False), (False, True)],
                         ids=["gpu-gpu", "gpu-host", "host-gpu"])
def test_gpu_memory_over_tcp(peer_factory, local_gpu, remote_gpu):
    """Across hosts GPU memory is staged through pinned host buffers; here over TCP loopback."""
    args = ("--gpu", str(gpu.device_count() - 1)) if remote_gpu else ()
    target = peer_factory(*args, "--size", str(32 * MiB))
    with TransferEngine(transports=("tcp",), slice_size=MiB, frame_bytes=MiB) as eng:  # several staged frames
        data = bytearray(os.urandom(12 * MiB))
        ptr = gpu.alloc(0, 32 * MiB) if local_gpu else None
        try:
            if local_gpu:
                to_gpu(ptr, data, 0)
                buf = eng.register(ptr, 32 * MiB)
            else:
                host = bytearray(32 * MiB)
                host[:len(data)] = data
                buf = eng.register(host)
            seg = eng.open_segment(target.name)
            reqs = [Request(Op.WRITE, buf.addr, seg, target.addr + 11, 5 * MiB + 3),  # sliced into 6 frames
                    Request(Op.WRITE, buf.addr + 6 * MiB, seg, target.addr + 8 * MiB, 4096)]
            statuses = engine_batch(eng, reqs)
            assert {s.transport for s in statuses} == {"tcp"}
            bad = [k for k in range(5)
                   if target.digest(target.addr + 11 + k * MiB, MiB) != sha(data[k * MiB:(k + 1) * MiB])]
            assert not bad, f"slices {bad} of the 5 MiB write differ"
            assert target.digest(target.addr + 11, 5 * MiB + 3) == sha(data[:5 * MiB + 3])
            assert target.digest(target.addr + 8 * MiB, 4096) == sha(data[6 * MiB:6 * MiB + 4096])
            eng.read(buf.addr + 16 * MiB, seg, target.addr + 11, 5 * MiB + 3)
            got = from_gpu(ptr + 16 * MiB, 5 * MiB + 3, 0) if local_gpu else bytes(host[16 * MiB:21 * MiB + 3])
            assert got == bytes(data[:5 * MiB + 3])
        finally:
            eng.close()
            if ptr is not None:
                gpu.free(ptr, 0)


def test_register_cupy_array_and_move_bytes(peer_factory):
    cupy = pytest.importorskip("cupy")
    arr = cupy.zeros(1 << 20, dtype=cupy.uint8)
    target = peer_factory("--size", str(2 * MiB))
    with TransferEngine() as eng:
        buf = eng.register(arr)
        assert buf.addr == arr.data.ptr and buf.length == arr.nbytes and buf.location.startswith("cuda:")
        seg = eng.open_segment(target.name)
        eng.read(buf.addr, seg, target.addr + 3, 1 << 20)  # host memory of another process into the CuPy array
        assert target.digest(target.addr + 3, 1 << 20) == sha(cupy.asnumpy(arr).tobytes())


def test_dmabuf_export_for_gpudirect_registration():
    """The DMA-BUF half of GPUDirect RDMA registration: the fd the NIC would register, for an interior range.

    (No machine here has both a GPU and an RDMA NIC, so ibv_reg_dmabuf_mr itself is not exercised.)
    """
    from moonlet.transport.rdma import gpudirect

    base = gpu.alloc(0, (8 << 20) + 4096)
    try:
        addr = base + 12345  # a range starting inside the allocation
        try:
            fd, start = gpudirect.export(addr)
        except gpu.GpuError as e:
            pytest.skip(f"this driver cannot export DMA-BUF: {e}")
        try:
            assert start == base - base % gpudirect.PAGE and start <= addr
            size = os.fstat(fd).st_size
            assert size == 0 or size >= (8 << 20) + 4096 - (start - base)
            assert os.readlink(f"/proc/self/fd/{fd}").startswith(("anon_inode:dmabuf", "/dmabuf"))
        finally:
            os.close(fd)
    finally:
        gpu.free(base, 0)


def _edit_buffer(seg, addr: int, **changes) -> None:
    """Alter this engine's cached descriptor of ``seg`` as a poisoned metadata store would have served it."""
    d = seg.descriptor
    d.buffers = [{**b, **changes} if b["addr"] == addr else b for b in d.buffers]
    seg.update(d)


def test_read_only_gpu_buffer_is_not_written_through_ipc(peer_factory):
    """A CUDA IPC mapping is always writable, so a remote_write=False GPU buffer publishes no IPC handle:
    a descriptor flipped to remote_write=True still reaches it only through the target, which refuses."""
    target = peer_factory("--gpu", "0", "--size", str(4 * MiB), "--read-only")
    with TransferEngine() as eng:
        mem = bytearray(os.urandom(MiB))
        buf = eng.register(mem)
        seg = eng.open_segment(target.name)
        (entry,) = [b for b in seg.buffers if b.addr == target.addr]
        assert entry.location == "cuda:0" and not entry.remote_write and entry.ipc is None
        _edit_buffer(seg, target.addr, remote_write=True)
        before = target.digest(target.addr, MiB)
        st = eng.submit([Request(Op.WRITE, buf.addr, seg, target.addr, MiB)]).wait()[0]
        assert st.state is State.FAILED and "does not allow this access" in st.reason, st.reason
        assert target.digest(target.addr, MiB) == before
        back = bytearray(MiB)
        eng.read(eng.register(back).addr, seg, target.addr, MiB)  # reading it is allowed
        assert sha(back) == before


def test_ipc_copies_stay_inside_the_opened_allocation(peer_factory):
    """A descriptor claiming a longer buffer than the allocation its IPC handle maps is caught against the
    range CUDA reports, not trusted; later requests go through the target, which checks them."""
    target = peer_factory("--gpu", "0", "--size", str(4 * MiB))
    with TransferEngine() as eng:
        mem = bytearray(os.urandom(2 * MiB))
        buf = eng.register(mem)
        seg = eng.open_segment(target.name)
        _edit_buffer(seg, target.addr, length=64 * MiB)  # the allocation holds 4 MiB
        st = eng.submit([Request(Op.WRITE, buf.addr, seg, target.addr + 4 * MiB - 4096, 2 * MiB)]).wait()[0]
        assert st.state is State.FAILED and "outside" in st.reason and "allocation" in st.reason, st.reason
        ok = eng.submit([Request(Op.WRITE, buf.addr, seg, target.addr + 5, MiB)]).wait()[0]
        assert ok.state is State.COMPLETED and ok.transport == "tcp", ok
        assert target.digest(target.addr + 5, MiB) == sha(mem[:MiB])
