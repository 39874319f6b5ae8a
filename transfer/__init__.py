"""pdmesh.transfer: moving chunk bytes between tier servers (ALLOC -> WRITE -> COMMIT with leases; docs/transfer.md).

Folder map: ``errors`` (typed errors with a retryable flag, the package's exception root), ``backend`` (the
data-path interface), ``shm_backend`` / ``nixl_backend`` / ``tcp_backend`` (data paths), ``protocol`` (control
messages over ``pdmesh.frames``), ``provider`` (``RegionProvider``: the receiving pool), ``reference_pool`` (a
simple reference pool for tests and benchmarks), ``receiver`` (decode side), ``sender`` (prefill side).

Nothing is imported here, so importing the package never loads NIXL.
"""
