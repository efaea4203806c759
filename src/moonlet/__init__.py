"""moonlet: a transfer engine that moves bytes between registered memory of processes on one host or many."""

from .batch import Batch, Op, Request, RequestStatus, State
from .config import EngineConfig
from .engine import TransferEngine
from .errors import (
    ConfigError,
    MemoryAccessError,
    MetadataError,
    MoonletError,
    ProtocolError,
    RegistrationError,
    SegmentError,
    TransferError,
)
from .memory import Buffer
from .metadata import MetadataServer
from .segment import RemoteBuffer, Segment

__version__ = "0.1.0"

__all__ = [
    "Batch", "Buffer", "ConfigError", "EngineConfig", "MemoryAccessError", "MetadataError", "MetadataServer",
    "MoonletError", "Op", "ProtocolError", "RegistrationError", "RemoteBuffer", "Request", "RequestStatus", "Segment",
    "SegmentError", "State", "TransferEngine", "TransferError",
]
