"""pdmesh.transfer: moving chunk bytes between tier servers (ALLOC -> WRITE -> COMMIT with leases; docs/transfer.md).

Folder map: ``errors`` (typed errors with a retryable flag, the package's exception root), ``backend`` (the
data-path interface, its options and typed write handles), ``shm_backend`` / ``nixl_backend`` / ``tcp_backend``
(data paths), ``registry`` (backends by name: the one way they are built), ``protocol`` (control messages over
``pdmesh.frames``), ``provider`` (``RegionProvider``: the receiving pool), ``reference_pool`` (a simple reference
pool for tests and benchmarks), ``receiver`` (decode side) with ``leases`` (when an allocated region may be
reused), ``sender`` (prefill side), ``peer_auth`` (the mutual HMAC challenge-response of every handshake),
``segment`` (named shared-memory segments: create, attach, lock, sweep stale ones), ``nixl_agent`` (NIXL agent
construction and UCX settings), ``device_staging`` (staging regions in device memory for the device path).

Nothing is imported here, so importing the package never loads NIXL.
"""
