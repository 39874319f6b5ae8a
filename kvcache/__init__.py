"""pdmesh.kvcache: the reuse tier — KV chunks in memory, on disk and in a shared remote store (docs/kvcache.md).

No vLLM and no torch here (tests/test_layout.py checks it): the tier stores opaque chunk bytes by key.

Folder map:

- ``keys`` (chained chunk keys seeded by the model fingerprint), ``record`` (checksummed disk records, MAC-tagged remote records).
- ``segment`` (the shared-memory segment) and ``pool`` (``ChunkPool``: slots, leases, pins, LRU eviction).
- ``disk`` (the disk tier), ``remote`` (``RemoteTier``, the guard with its breaker, ``open_remote``),
  ``remote_redis`` and ``remote_cache_server`` (the two remote clients), ``cache_server`` (the shared cache
  server process) and ``cache_store`` (its byte-bounded LRU).
- The tier server, one per worker node: ``tier`` (the core: lookups, loads, write-back, pushes), ``control_ops``
  (the unix control socket the connector speaks; the op table), ``tier_http`` (the HTTP API), ``server``
  (listeners and lifecycle), ``ready_line`` (how it says it serves), ``transfer_node`` (its transfer endpoint,
  ``pdmesh.transfer`` on top of the pool), ``client`` (the control socket's client), ``config``, ``metrics``,
  ``cli`` (``pdmesh tier-server`` / ``pdmesh cache-server``).
- ``errors``: ``KVCacheError``, the root of every error this package raises.
"""
