"""Mooncake's TCP data protocol, so moonlet and Mooncake engines exchange bytes: ``transport.py`` (initiator),
``server.py`` (target), ``protocol.py`` (the wire format and handshake, sans-IO)."""
