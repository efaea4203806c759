"""Exceptions raised by moonlet.

Every error names the problem in its message, so a user reading a traceback
knows which address, segment or peer was at fault without a debugger.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .batch import RequestStatus


class MoonletError(Exception):
    """Base class of every error moonlet raises on purpose."""


class ConfigError(MoonletError, ValueError):
    """A configuration value or argument is invalid."""


class RegistrationError(MoonletError, ValueError):
    """A memory registration was refused (overlap, zero length, bad object...)."""


class MemoryAccessError(MoonletError):
    """An address range is not inside registered memory, or is not allowed."""


class SegmentError(MoonletError):
    """A segment could not be resolved (unknown name, peer gone, bad descriptor)."""


class MetadataError(MoonletError):
    """The metadata service failed or could not be reached."""


class ProtocolError(MoonletError):
    """A peer sent bytes that do not follow the wire format."""


class TransferError(MoonletError):
    """A transfer did not complete. ``statuses`` holds the per-request outcome."""

    def __init__(self, message: str, statuses: list[RequestStatus] | None = None) -> None:
        super().__init__(message)
        self.statuses = statuses or []
