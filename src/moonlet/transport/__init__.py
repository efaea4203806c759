"""Transports: one module or package each, all implementing :class:`~moonlet.transport.base.Transport`."""
