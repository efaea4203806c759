"""Reading small kernel-provided text files (sysfs, procfs) that may be absent."""

from __future__ import annotations


def read(path: str) -> str:
    """The stripped contents of ``path``, or "" if it cannot be read."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""
