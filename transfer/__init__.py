"""pdmesh transfer: moving chunk bytes between tier servers (ALLOC -> WRITE -> COMMIT with leases).

Modules: ``errors`` (typed errors), ``backend`` (data-path interface), ``tcp_backend`` / ``shm_backend`` /
``nixl_backend`` (data paths), ``protocol`` (control frames), ``provider`` (RegionProvider: the receiving pool),
``reference_pool`` (simple reference pool), ``receiver`` (decode side), ``sender`` (prefill side).
See docs/transfer.md. Nothing is imported here, so ``import transfer`` never loads NIXL.
"""
