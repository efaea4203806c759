"""TCP transport: ``transport.py`` (the transport), ``protocol.py`` (the wire format, sans-IO), ``client.py``
(initiator), ``server.py`` (target reactor and control dispatcher), ``sockio.py``, ``dial.py``."""
