"""A thin ctypes binding to rdma-core's ``libibverbs.so.1``: only the verbs moonlet uses.

No compile step and no Python-version-specific extension: the library is
loaded at run time, so the same code runs on any CPython with rdma-core
installed.  Struct layouts are the stable ABI of ``<infiniband/verbs.h>``
(checked against rdma-core 44).  The data-path verbs (``ibv_post_send``,
``ibv_poll_cq``, ``ibv_req_notify_cq``) are inline functions in that header
that call through the provider's function table inside ``struct ibv_context``;
this module calls the same table entries.
"""

from __future__ import annotations

import ctypes as C
import ctypes.util
import os
from collections.abc import Iterator
from contextlib import contextmanager

u8, u16, u32, u64 = C.c_uint8, C.c_uint16, C.c_uint32, C.c_uint64
vp = C.c_void_p

# access flags (enum ibv_access_flags)
ACCESS_LOCAL_WRITE, ACCESS_REMOTE_WRITE, ACCESS_REMOTE_READ = 1, 2, 4
# QP states, types, attribute masks
QPS_RESET, QPS_INIT, QPS_RTR, QPS_RTS, QPS_ERR = 0, 1, 2, 3, 6
QPT_RC = 2
QP_STATE, QP_ACCESS_FLAGS, QP_PKEY_INDEX, QP_PORT, QP_AV, QP_PATH_MTU = 1, 8, 16, 32, 128, 256
QP_TIMEOUT, QP_RETRY_CNT, QP_RNR_RETRY, QP_RQ_PSN, QP_MAX_QP_RD_ATOMIC = 512, 1024, 2048, 4096, 8192
QP_MIN_RNR_TIMER, QP_SQ_PSN, QP_MAX_DEST_RD_ATOMIC, QP_DEST_QPN = 32768, 65536, 131072, 1048576
# work requests
WR_RDMA_WRITE, WR_RDMA_READ = 0, 4
SEND_SIGNALED = 2
# work completion status
WC_SUCCESS, WC_WR_FLUSH_ERR, WC_REM_ACCESS_ERR, WC_RETRY_EXC_ERR = 0, 5, 10, 12
PORT_ACTIVE = 4
LINK_LAYER_ETHERNET = 2
MTU_BYTES = {1: 256, 2: 512, 3: 1024, 4: 2048, 5: 4096}

# Byte offsets in struct ibv_context of the provider ops the inline verbs call.
_OP_POLL_CQ, _OP_REQ_NOTIFY_CQ, _OP_POST_SEND = 96, 104, 208
_QP_NUM_OFFSET = 52  # struct ibv_qp.qp_num
_MR_LKEY_OFFSET, _MR_RKEY_OFFSET = 36, 40  # struct ibv_mr
_COMP_CHANNEL_FD_OFFSET = 8  # struct ibv_comp_channel.fd


class VerbsError(OSError):
    """A verb failed; the message names the verb and the errno."""


class Sge(C.Structure):
    _fields_ = [("addr", u64), ("length", u32), ("lkey", u32)]


class SendWR(C.Structure):
    """struct ibv_send_wr (128 bytes) with the RDMA member of its union."""

    _fields_ = [("wr_id", u64), ("next", vp), ("sg_list", vp), ("num_sge", C.c_int), ("opcode", C.c_int),
                ("send_flags", C.c_uint), ("imm_data", u32), ("remote_addr", u64), ("rkey", u32),
                ("_rest", C.c_char * 76)]


class WC(C.Structure):
    """struct ibv_wc (48 bytes)."""

    _fields_ = [("wr_id", u64), ("status", C.c_int), ("opcode", C.c_int), ("vendor_err", u32),
                ("byte_len", u32), ("imm_data", u32), ("qp_num", u32), ("src_qp", u32), ("wc_flags", C.c_uint),
                ("pkey_index", u16), ("slid", u16), ("sl", u8), ("dlid_path_bits", u8), ("_pad", C.c_char * 2)]


class QpCap(C.Structure):
    _fields_ = [("max_send_wr", u32), ("max_recv_wr", u32), ("max_send_sge", u32), ("max_recv_sge", u32),
                ("max_inline_data", u32)]


class QpInitAttr(C.Structure):
    _fields_ = [("qp_context", vp), ("send_cq", vp), ("recv_cq", vp), ("srq", vp), ("cap", QpCap),
                ("qp_type", C.c_int), ("sq_sig_all", C.c_int), ("_pad", C.c_char * 4)]


class GlobalRoute(C.Structure):
    _fields_ = [("dgid", u8 * 16), ("flow_label", u32), ("sgid_index", u8), ("hop_limit", u8),
                ("traffic_class", u8), ("_pad", u8)]


class AhAttr(C.Structure):
    _fields_ = [("grh", GlobalRoute), ("dlid", u16), ("sl", u8), ("src_path_bits", u8), ("static_rate", u8),
                ("is_global", u8), ("port_num", u8), ("_pad", u8)]


class QpAttr(C.Structure):
    _fields_ = [("qp_state", C.c_int), ("cur_qp_state", C.c_int), ("path_mtu", C.c_int),
                ("path_mig_state", C.c_int), ("qkey", u32), ("rq_psn", u32), ("sq_psn", u32),
                ("dest_qp_num", u32), ("qp_access_flags", C.c_int), ("cap", QpCap), ("ah_attr", AhAttr),
                ("alt_ah_attr", AhAttr), ("pkey_index", u16), ("alt_pkey_index", u16),
                ("en_sqd_async_notify", u8), ("sq_draining", u8), ("max_rd_atomic", u8),
                ("max_dest_rd_atomic", u8), ("min_rnr_timer", u8), ("port_num", u8), ("timeout", u8),
                ("retry_cnt", u8), ("rnr_retry", u8), ("alt_port_num", u8), ("alt_timeout", u8), ("_pad", u8),
                ("rate_limit", u32), ("_pad2", C.c_char * 4)]


assert C.sizeof(SendWR) == 128 and C.sizeof(WC) == 48 and C.sizeof(QpInitAttr) == 64
assert C.sizeof(AhAttr) == 32 and C.sizeof(QpAttr) == 144

_POLL_CQ = C.CFUNCTYPE(C.c_int, vp, C.c_int, C.POINTER(WC))
_REQ_NOTIFY = C.CFUNCTYPE(C.c_int, vp, C.c_int)
_POST_SEND = C.CFUNCTYPE(C.c_int, vp, vp, C.POINTER(vp))

_lib: C.CDLL | None = None
_load_error = ""


def _load() -> C.CDLL | None:
    global _lib, _load_error
    if _lib is not None or _load_error:
        return _lib
    name = ctypes.util.find_library("ibverbs") or "libibverbs.so.1"
    try:
        lib = C.CDLL(name, use_errno=True)
    except OSError as e:
        _load_error = f"libibverbs not found ({e}); install rdma-core's libibverbs1"
        return None
    sig = {
        "ibv_get_device_list": (vp, [C.POINTER(C.c_int)]),
        "ibv_free_device_list": (None, [vp]),
        "ibv_get_device_name": (C.c_char_p, [vp]),
        "ibv_open_device": (vp, [vp]),
        "ibv_close_device": (C.c_int, [vp]),
        "ibv_query_device": (C.c_int, [vp, vp]),
        "ibv_query_port": (C.c_int, [vp, u8, vp]),
        "ibv_query_gid": (C.c_int, [vp, u8, C.c_int, vp]),
        "ibv_alloc_pd": (vp, [vp]),
        "ibv_dealloc_pd": (C.c_int, [vp]),
        "ibv_reg_mr": (vp, [vp, vp, C.c_size_t, C.c_int]),
        "ibv_reg_dmabuf_mr": (vp, [vp, u64, C.c_size_t, u64, C.c_int, C.c_int]),
        "ibv_dereg_mr": (C.c_int, [vp]),
        "ibv_create_comp_channel": (vp, [vp]),
        "ibv_destroy_comp_channel": (C.c_int, [vp]),
        "ibv_create_cq": (vp, [vp, C.c_int, vp, vp, C.c_int]),
        "ibv_destroy_cq": (C.c_int, [vp]),
        "ibv_get_cq_event": (C.c_int, [vp, C.POINTER(vp), C.POINTER(vp)]),
        "ibv_ack_cq_events": (None, [vp, C.c_uint]),
        "ibv_create_qp": (vp, [vp, C.POINTER(QpInitAttr)]),
        "ibv_modify_qp": (C.c_int, [vp, C.POINTER(QpAttr), C.c_int]),
        "ibv_destroy_qp": (C.c_int, [vp]),
        "ibv_wc_status_str": (C.c_char_p, [C.c_int]),
    }
    for fn, (res, args) in sig.items():
        f = getattr(lib, fn)
        f.restype, f.argtypes = res, args
    _lib = lib
    return lib


def unavailable_reason() -> str:
    """Why no verbs device can be used here, or '' when one can."""
    if _load() is None:
        return _load_error
    if not device_names():
        return "libibverbs finds no RDMA device (no NIC, or its driver/provider is not loaded)"
    return ""


def _fail(verb: str) -> VerbsError:
    err = C.get_errno()
    return VerbsError(err, f"{verb} failed: {os.strerror(err) if err else 'error'}")


def _check(rc: int, verb: str) -> None:
    if rc:
        raise VerbsError(rc if rc > 0 else C.get_errno(), f"{verb} failed: {os.strerror(abs(rc))}")


def _lib_or_raise() -> C.CDLL:
    lib = _load()
    if lib is None:
        raise VerbsError(0, _load_error)
    return lib


@contextmanager
def _device_list() -> Iterator[list[tuple[int, str]]]:
    """(device pointer, name) of every device; the pointers are valid inside the ``with`` only."""
    lib = _lib_or_raise()
    n = C.c_int(0)
    lst = lib.ibv_get_device_list(C.byref(n))
    if not lst:
        raise _fail("ibv_get_device_list")
    try:
        arr = C.cast(lst, C.POINTER(vp))
        yield [(arr[i], lib.ibv_get_device_name(arr[i]).decode()) for i in range(n.value)]
    finally:
        lib.ibv_free_device_list(lst)


def device_names() -> list[str]:
    """Names of the RDMA devices libibverbs sees (e.g. ``mlx5_0``, ``rxe0``)."""
    try:
        with _device_list() as devices:
            return [name for _, name in devices]
    except VerbsError:
        return []


def wc_status_str(status: int) -> str:
    return _lib_or_raise().ibv_wc_status_str(status).decode()


class Context:
    """An opened device with one protection domain (all of moonlet's memory and QPs on it share it)."""

    def __init__(self, name: str) -> None:
        lib = self._lib = _lib_or_raise()
        with _device_list() as devices:
            dev = next((ptr for ptr, found in devices if found == name), None)
            if dev is None:
                raise VerbsError(0, f"no RDMA device named {name!r}")
            self.ctx = lib.ibv_open_device(dev)
        if not self.ctx:
            raise _fail(f"ibv_open_device({name})")
        self.name = name
        self.pd = lib.ibv_alloc_pd(self.ctx)
        if not self.pd:
            lib.ibv_close_device(self.ctx)
            raise _fail("ibv_alloc_pd")
        table = C.cast(self.ctx, C.POINTER(vp))
        self._poll_cq = _POLL_CQ(table[_OP_POLL_CQ // 8])
        self._req_notify = _REQ_NOTIFY(table[_OP_REQ_NOTIFY_CQ // 8])
        self._post_send = _POST_SEND(table[_OP_POST_SEND // 8])
        attr = (C.c_char * 232)()
        _check(lib.ibv_query_device(self.ctx, attr), "ibv_query_device")
        raw = bytes(attr)
        self.max_mr_size = int.from_bytes(raw[80:88], "little")
        self.max_qp_wr = int.from_bytes(raw[112:116], "little")
        self.max_cqe = int.from_bytes(raw[132:136], "little")
        self.max_qp_rd_atom = int.from_bytes(raw[144:148], "little")
        self.ports = raw[227]

    def port(self, num: int) -> dict:
        """State, MTUs, LID and link layer of port ``num``."""
        attr = (C.c_char * 64)()
        _check(self._lib.ibv_query_port(self.ctx, num, attr), "ibv_query_port")
        raw = bytes(attr)
        return {"state": int.from_bytes(raw[0:4], "little"), "max_mtu": int.from_bytes(raw[4:8], "little"),
                "active_mtu": int.from_bytes(raw[8:12], "little"),
                "gid_tbl_len": int.from_bytes(raw[12:16], "little", signed=True),
                "lid": int.from_bytes(raw[34:36], "little"), "link_layer": raw[46]}

    def gid(self, port: int, index: int) -> bytes:
        out = (u8 * 16)()
        _check(self._lib.ibv_query_gid(self.ctx, port, index, out), "ibv_query_gid")
        return bytes(out)

    def reg_mr(self, addr: int, length: int, access: int) -> MemoryRegion:
        mr = self._lib.ibv_reg_mr(self.pd, addr, length, access)
        if not mr:
            raise _fail(f"ibv_reg_mr([{addr:#x}, +{length}))")
        return MemoryRegion(self._lib, mr)

    def reg_dmabuf_mr(self, offset: int, length: int, iova: int, fd: int, access: int) -> MemoryRegion:
        mr = self._lib.ibv_reg_dmabuf_mr(self.pd, offset, length, iova, fd, access)
        if not mr:
            raise _fail(f"ibv_reg_dmabuf_mr(fd {fd}, [{iova:#x}, +{length}))")
        return MemoryRegion(self._lib, mr)

    def close(self) -> None:
        if self.pd:
            self._lib.ibv_dealloc_pd(self.pd)
            self.pd = None
        if self.ctx:
            self._lib.ibv_close_device(self.ctx)
            self.ctx = None


class MemoryRegion:
    """A registered memory region: its local and remote keys."""

    def __init__(self, lib: C.CDLL, mr: int) -> None:
        self._lib = lib
        self.mr = mr
        self.lkey = u32.from_address(mr + _MR_LKEY_OFFSET).value
        self.rkey = u32.from_address(mr + _MR_RKEY_OFFSET).value

    def close(self) -> None:
        if self.mr:
            self._lib.ibv_dereg_mr(self.mr)
            self.mr = 0


class CompletionQueue:
    """A CQ with its own completion channel, so an idle poller sleeps in ``poll(2)`` instead of spinning."""

    def __init__(self, ctx: Context, depth: int) -> None:
        lib = self._lib = ctx._lib
        self._ctx = ctx
        self.channel = lib.ibv_create_comp_channel(ctx.ctx)
        if not self.channel:
            raise _fail("ibv_create_comp_channel")
        self.cq = lib.ibv_create_cq(ctx.ctx, depth, None, self.channel, 0)
        if not self.cq:
            lib.ibv_destroy_comp_channel(self.channel)
            raise _fail("ibv_create_cq")
        self.fd = C.c_int.from_address(self.channel + _COMP_CHANNEL_FD_OFFSET).value
        os.set_blocking(self.fd, False)
        self._wcs = (WC * 64)()
        self._unacked = 0

    def poll(self) -> Iterator[WC]:
        """Every completion available now."""
        wcs = self._wcs
        while True:
            n = self._ctx._poll_cq(self.cq, 64, wcs)
            if n < 0:
                raise VerbsError(0, "ibv_poll_cq failed")
            for i in range(n):
                yield wcs[i]
            if n < 64:
                return

    def arm(self) -> None:
        """Ask for an event on the channel fd at the next completion."""
        _check(self._ctx._req_notify(self.cq, 0), "ibv_req_notify_cq")

    def consume_event(self) -> None:
        """Take the pending channel event (if any) after the fd polled readable."""
        cq, ctx = vp(), vp()
        if self._lib.ibv_get_cq_event(self.channel, C.byref(cq), C.byref(ctx)) == 0:
            self._unacked += 1
            if self._unacked >= 64:
                self._lib.ibv_ack_cq_events(self.cq, self._unacked)
                self._unacked = 0

    def close(self) -> None:
        if self.cq:
            if self._unacked:
                self._lib.ibv_ack_cq_events(self.cq, self._unacked)
            self._lib.ibv_destroy_cq(self.cq)
            self._lib.ibv_destroy_comp_channel(self.channel)
            self.cq = None


class QueuePair:
    """An RC queue pair, driven RESET -> INIT -> RTR -> RTS by :meth:`connect`."""

    def __init__(self, ctx: Context, cq: CompletionQueue, depth: int, port: int) -> None:
        self._ctx = ctx
        self._lib = ctx._lib
        init = QpInitAttr(send_cq=cq.cq, recv_cq=cq.cq, qp_type=QPT_RC, sq_sig_all=0)
        init.cap.max_send_wr, init.cap.max_recv_wr, init.cap.max_send_sge, init.cap.max_recv_sge = depth, 1, 1, 1
        self.qp = self._lib.ibv_create_qp(ctx.pd, C.byref(init))
        if not self.qp:
            raise _fail("ibv_create_qp")
        self.qpn = u32.from_address(self.qp + _QP_NUM_OFFSET).value
        self.port = port
        self.depth = depth
        self._bad = vp()

    def _modify(self, attr: QpAttr, mask: int, what: str) -> None:
        _check(self._lib.ibv_modify_qp(self.qp, C.byref(attr), mask), f"ibv_modify_qp(to {what})")

    def connect(self, *, psn: int, remote_qpn: int, remote_psn: int, remote_gid: bytes, remote_lid: int,
                gid_index: int, mtu: int, rd_atomic: int, access: int, timeout: int = 14, retry: int = 7) -> None:
        """Bring the QP to RTS against the remote QP described by the other arguments."""
        a = QpAttr(qp_state=QPS_INIT, pkey_index=0, port_num=self.port, qp_access_flags=access)
        self._modify(a, QP_STATE | QP_PKEY_INDEX | QP_PORT | QP_ACCESS_FLAGS, "INIT")
        a = QpAttr(qp_state=QPS_RTR, path_mtu=mtu, dest_qp_num=remote_qpn, rq_psn=remote_psn,
                   max_dest_rd_atomic=rd_atomic, min_rnr_timer=12)
        a.ah_attr.is_global = 1
        a.ah_attr.dlid = remote_lid
        a.ah_attr.port_num = self.port
        a.ah_attr.grh.dgid[:] = list(remote_gid)
        a.ah_attr.grh.sgid_index = gid_index
        a.ah_attr.grh.hop_limit = 64
        self._modify(a, QP_STATE | QP_AV | QP_PATH_MTU | QP_DEST_QPN | QP_RQ_PSN | QP_MAX_DEST_RD_ATOMIC
                     | QP_MIN_RNR_TIMER, "RTR")
        a = QpAttr(qp_state=QPS_RTS, timeout=timeout, retry_cnt=retry, rnr_retry=7, sq_psn=psn,
                   max_rd_atomic=rd_atomic)
        self._modify(a, QP_STATE | QP_TIMEOUT | QP_RETRY_CNT | QP_RNR_RETRY | QP_SQ_PSN | QP_MAX_QP_RD_ATOMIC, "RTS")

    def to_error(self) -> None:
        """Move to ERR: the NIC stops, and every posted work request completes as flushed."""
        if self.qp:
            self._modify(QpAttr(qp_state=QPS_ERR), QP_STATE, "ERR")

    def post(self, first: SendWR) -> None:
        """Post a chain of work requests (linked through ``next``)."""
        rc = self._ctx._post_send(self.qp, C.addressof(first), C.byref(self._bad))
        if rc:
            raise VerbsError(rc, f"ibv_post_send failed: {os.strerror(rc)}")

    def close(self) -> None:
        if self.qp:
            self._lib.ibv_destroy_qp(self.qp)
            self.qp = None
