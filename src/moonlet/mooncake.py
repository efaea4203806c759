"""``from moonlet.mooncake import TransferEngine``: the documented import of :mod:`moonlet.compat.mooncake`."""

from .compat.mooncake import *  # noqa: F403
from .compat.mooncake import __all__  # noqa: F401
