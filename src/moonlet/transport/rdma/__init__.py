"""RDMA transport: ``transport.py`` (the transport), ``verbs.py`` (libibverbs through ctypes), ``nic.py`` (NICs and
their distance to memory), ``gpudirect.py`` (GPU memory regions)."""
