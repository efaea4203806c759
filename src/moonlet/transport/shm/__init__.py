"""Same-host transport for host memory: ``transport.py`` (the initiator's paths, mapped and attached),
``target.py`` (PULL/PUSH frames served by cross-memory copies, registered with the TCP server),
``cma.py`` (``process_vm_readv``/``writev``)."""
