"""RDMA pieces that need no device: NIC ranking, GID choice, config, descriptor and CONNECT framing.

The transport itself is tested against a real verbs device in tests/rdma/.
"""

from __future__ import annotations

import ctypes
import json

import pytest

from moonlet import EngineConfig
from moonlet.errors import ConfigError, ProtocolError, SegmentError
from moonlet.segment import SegmentDescriptor
from moonlet.transport.rdma import verbs
from moonlet.transport.rdma.nic import Nic, load_matrix, pick_gid_index, tiers
from moonlet.transport.rdma.transport import chunks, span
from moonlet.transport.tcp import protocol as P


def nic(name: str, numa: int, path: str = "") -> Nic:
    return Nic(name, 1, 3, bytes(16), 0, 5, numa, path)


NICS = [nic("mlx5_0", 0, "/sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0"),
        nic("mlx5_1", 0, "/sys/devices/pci0000:00/0000:00:02.0/0000:02:00.0"),
        nic("mlx5_2", 1, "/sys/devices/pci0000:80/0000:80:01.0/0000:81:00.0"),
        nic("mlx5_3", 1, "/sys/devices/pci0000:80/0000:80:02.0/0000:82:00.0")]


def names(groups):
    return [[n.name for n in g] for g in groups]


def test_host_memory_prefers_its_numa_node_and_stripes_over_the_tie():
    assert names(tiers("cpu:1", NICS, {})) == [["mlx5_2", "mlx5_3"], ["mlx5_0", "mlx5_1"]]
    assert names(tiers("cpu:0", NICS, {})) == [["mlx5_0", "mlx5_1"], ["mlx5_2", "mlx5_3"]]


def test_gpu_memory_prefers_the_nic_behind_the_same_pcie_switch():
    gpu = "/sys/devices/pci0000:80/0000:80:02.0/0000:82:00.1"
    assert names(tiers("cuda:3", NICS, {}, gpu, 1))[0] == ["mlx5_3"]
    assert names(tiers("cuda:3", NICS, {}, gpu, 1))[1] == ["mlx5_2"]
    # without a PCI path, the GPU's NUMA node decides
    assert names(tiers("cuda:0", NICS, {}, "", 0))[0] == ["mlx5_0", "mlx5_1"]


def test_matrix_overrides_distance(tmp_path):
    matrix = {"cpu:0": ["mlx5_3", "mlx5_2"]}
    assert names(tiers("cpu:0", NICS, matrix)) == [["mlx5_3", "mlx5_2"], ["mlx5_0", "mlx5_1"]]
    f = tmp_path / "m.json"
    f.write_text(json.dumps(matrix))
    assert load_matrix(str(f)) == matrix
    assert load_matrix(json.dumps(matrix)) == matrix
    with pytest.raises(ConfigError, match="rdma_nic_matrix"):
        load_matrix('{"cpu:0": "mlx5_0"}')
    with pytest.raises(ConfigError, match="rdma_nic_matrix"):
        load_matrix(str(tmp_path / "missing.json"))


def test_gid_index_prefers_roce_v2_with_ipv4():
    v4 = bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 1])
    link_local = bytes.fromhex("fe80000000000000") + bytes(7) + b"\x01"
    gids = {0: link_local, 1: link_local, 2: v4, 3: v4, 4: bytes(16)}
    types = {0: "IB/RoCE v1", 1: "RoCE v2", 2: "IB/RoCE v1", 3: "RoCE v2"}
    assert pick_gid_index(gids, types, ethernet=True) == 3
    assert pick_gid_index({0: link_local, 1: link_local}, {0: "IB/RoCE v1", 1: "RoCE v2"}, True) == 1
    assert pick_gid_index({0: link_local}, {}, ethernet=False) == 0
    assert pick_gid_index({0: bytes(16)}, {}, ethernet=True) is None


def test_rdma_config_is_validated():
    with pytest.raises(ConfigError, match="rdma_qps"):
        EngineConfig(rdma_qps=0)
    with pytest.raises(ConfigError, match="rdma_gpu"):
        EngineConfig(rdma_gpu="sometimes")
    with pytest.raises(ConfigError, match="rdma_devices"):
        EngineConfig(rdma_devices="mlx5_0")
    with pytest.raises(ConfigError, match="rdma_queue_depth"):
        EngineConfig(rdma_queue_depth=4)


def test_descriptor_carries_nics_and_rkeys():
    d = SegmentDescriptor("a", "i", "h", 1, {"tcp": "x:1", "rdma": "x:1"},
                          [{"addr": 4096, "length": 8192, "location": "cpu:0", "rkeys": {"rxe0": [77, 78]}}],
                          nics=[NICS[0].describe()])
    back = SegmentDescriptor.from_json(d.to_json())
    assert back.nics == [NICS[0].describe()]
    assert back.buffers[0]["rkeys"] == {"rxe0": [77, 78]}
    bad = json.loads(d.to_json())
    bad["buffers"][0]["rkeys"] = {"rxe0": ["x"]}
    with pytest.raises(SegmentError, match="malformed"):
        SegmentDescriptor.from_json(json.dumps(bad))


def test_memory_regions_are_cut_evenly_and_both_sides_agree():
    assert chunks(1000, 10, 4) == [(1000, 4), (1004, 4), (1008, 2)]
    assert chunks(0, 8, 8) == [(0, 8)]
    for length, most in ((10 << 30, 1 << 30), ((5 << 30) + 7, 1 << 30), (12345, 4096)):
        pieces = chunks(0, length, most)
        assert sum(n for _, n in pieces) == length and max(n for _, n in pieces) <= most
        assert all(a == i * span(length, len(pieces)) for i, (a, _) in enumerate(pieces))


def test_connect_frames_round_trip_and_reject_garbage():
    frame = P.encode_connect({"service": "rdma", "qpn": 17})
    (ev,) = P.FrameReader(initiator=False).feed(frame)
    assert ev.kind == P.CONNECT and P.decode_connect(ev.body) == {"service": "rdma", "qpn": 17}
    with pytest.raises(ProtocolError, match="malformed CONNECT"):
        P.decode_connect(b"[1, 2]           ")
    with pytest.raises(ProtocolError, match="at most"):
        P.parse_prefix(P.encode_prefix(P.CONNECT, 0, 0, P.MAX_CONTROL_BODY + 1))


def test_struct_layouts_match_the_verbs_abi():
    # offsets from <infiniband/verbs.h> (rdma-core 44), checked with offsetof() when this binding was written
    assert verbs.SendWR.remote_addr.offset == 40 and verbs.SendWR.rkey.offset == 48
    assert verbs.WC.qp_num.offset == 28 and verbs.WC.status.offset == 8
    assert verbs.QpAttr.ah_attr.offset == 56 and verbs.QpAttr.timeout.offset == 130
    assert verbs.QpAttr.max_dest_rd_atomic.offset == 127 and verbs.QpAttr.port_num.offset == 129
    assert verbs.AhAttr.port_num.offset == 30 and verbs.GlobalRoute.sgid_index.offset == 20
    assert ctypes.sizeof(verbs.QpInitAttr) == 64 and verbs.QpInitAttr.qp_type.offset == 52
