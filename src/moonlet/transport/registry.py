"""Every transport moonlet has, in the default order of preference: same process, same host, RDMA, anywhere.

Adding a transport is its own package (a :class:`~.base.Transport` and its
:class:`~.spec.TransportSpec`) and one line here.
"""

from __future__ import annotations

from ..config import EngineConfig
from .cuda_ipc import SPEC as CUDA_IPC
from .local.transport import SPEC as LOCAL
from .mooncake_wire.transport import SPEC as MOONCAKE_TCP
from .rdma.transport import SPEC as RDMA
from .shm.transport import SPEC as SHM
from .spec import TransportSpec
from .tcp.transport import SPEC as TCP

TRANSPORTS: tuple[TransportSpec, ...] = (
    LOCAL,
    CUDA_IPC,
    SHM,
    RDMA,
    TCP,
    MOONCAKE_TCP,
)

def by_name() -> dict[str, TransportSpec]:
    """The specs of :data:`TRANSPORTS` by name."""
    return {spec.name: spec for spec in TRANSPORTS}


def default_order() -> tuple[str, ...]:
    """The names of the transports in the default order (those with ``extra`` are appended only on demand)."""
    return tuple(spec.name for spec in TRANSPORTS if spec.extra is None)


def available(cfg: EngineConfig | None = None) -> tuple[str, ...]:
    """The transports of the default order this host can run, in that order."""
    cfg = cfg or EngineConfig()
    return tuple(spec.name for spec in TRANSPORTS if spec.extra is None and not spec.missing(cfg))
