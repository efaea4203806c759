"""Same-host transport for host memory: ``transport.py`` (the initiator's paths, mapped and attached),
``mapping.py`` (a peer's ``allocate()`` buffer mapped here), ``target.py`` (PULL/PUSH frames served by
cross-memory copies, registered with the TCP server), ``cma.py`` (``process_vm_readv``/``writev``)."""
