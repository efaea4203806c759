"""Helpers shared by the test files, one job per module.

- :mod:`helpers.memory`: random registered memory, and the digests that check what landed in it.
- :mod:`helpers.procs`: target engines in other processes, and readers of /proc (RSS, threads, fds, CPU time).
- :mod:`helpers.engines`: factories of initiator engines.
- :mod:`helpers.net`: raw sockets to an engine or a metadata server.
- :mod:`helpers.stores`: real etcd and Redis servers.

``tests/`` is on ``sys.path`` through pytest's ``pythonpath`` setting (pyproject.toml), so
``from helpers.memory import sha`` works however pytest is started, from any test directory
(tests/rdma and tests/faults included); tests/peer.py, run as a script from tests/, imports them too.
Importing a helper starts nothing: engines and processes exist only once a test asks for them.
"""
