"""JSON from peers and stores, parsed with its size and nesting bounded first.

Every JSON text moonlet reads from outside (control frame bodies, Mooncake
handshakes, segment descriptors) goes through :func:`loads`, so a hostile
sender can neither make the parser recurse until ``RecursionError`` (a body of
60,000 ``[``) nor make it build a huge value, and the only exception is
``ValueError``, which each caller turns into its own error naming what it read.
"""

from __future__ import annotations

import json
import re

_NOT_SYNTAX = bytes(c for c in range(256) if c not in b'"[]{}')
_ONE_KIND = bytes.maketrans(b"{}", b"[]")  # json recurses once per open bracket, whichever kind
_STRING = re.compile(rb'"[^"]*"')


def check_nesting(data: bytes, max_depth: int) -> None:
    """Raise ValueError if JSON ``data`` nests arrays and objects deeper than ``max_depth`` or its brackets do
    not pair up; passes of C speed over the bytes, no recursion.

    Escapes go first (escaped backslashes, then escaped quotes), then everything
    but quotes and brackets, then strings: what is left is the brackets outside
    strings, all made square, whose innermost pairs are removed once per level.
    """
    skeleton = data.replace(b"\\\\", b"").replace(b'\\"', b"").translate(_ONE_KIND, _NOT_SYNTAX)
    skeleton = _STRING.sub(b"", skeleton.replace(b'""', b"")).replace(b'"', b"")
    for _ in range(max_depth):
        if not skeleton:
            return
        inner = skeleton.replace(b"[]", b"")
        if len(inner) == len(skeleton):  # nothing pairs up any more
            if skeleton.startswith(b"[" * (max_depth + 1)):
                break
            raise ValueError("JSON brackets do not pair up")
        skeleton = inner
    if skeleton:
        raise ValueError(f"JSON nested deeper than {max_depth} levels")


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def loads(data: bytes | str, max_bytes: int, max_depth: int) -> object:
    """``json.loads(data)`` once ``data`` is known to be at most ``max_bytes`` bytes nested at most ``max_depth``
    deep; NaN and Infinity are refused. Raises ValueError (bad UTF-8 included) and nothing else."""
    raw = data.encode() if isinstance(data, str) else bytes(data)
    if len(raw) > max_bytes:
        raise ValueError(f"{len(raw)} bytes of JSON, at most {max_bytes}")
    check_nesting(raw, max_depth)
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except RecursionError:  # unreachable after the check; kept so the promise holds whatever json does
        raise ValueError(f"JSON nested deeper than {max_depth} levels") from None
