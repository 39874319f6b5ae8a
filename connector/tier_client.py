"""The connector's view of the local tier server: :class:`kvcache.client.TierClient` shaped for its two halves.

Implements :class:`pdmesh.connector.scheduler.TierChunkLookup` and
:class:`pdmesh.connector.worker.TierWorkerClient`. Every call goes over the tier's unix socket with the client's
timeout and raises on failure (the halves treat any exception as "tier unavailable": compute instead).
"""

from __future__ import annotations

from collections.abc import Sequence

from pdmesh.breaker import CircuitBreaker
from pdmesh.connector.config import ConnectorConfig
from pdmesh.kvcache.client import TierClient, TierUnavailable
from pdmesh.kvcache.keys import ModelFingerprint
from pdmesh.security import cluster_token_from_env
from pdmesh.transfer.segment import attach_segment


class ConnectorTierClient:
    def __init__(
        self,
        socket_path: str,
        token: str,
        timeout_s: float,
        fingerprint: ModelFingerprint,
        load_timeout_s: float = 10.0,
        chunk_tokens: int | None = None,
    ) -> None:
        """``chunk_tokens``: told to the tier at hello (its ``/lookup`` by token ids then chunks alike)."""
        self.address = socket_path
        self.load_timeout_s = load_timeout_s
        self._mapped_name: str | None = None
        self._view: memoryview | None = None
        self._client = TierClient(
            socket_path,
            token,
            timeout_s=timeout_s,
            fingerprint=fingerprint.to_dict(),
            chunk_tokens=chunk_tokens,
        )
        self._breaker = CircuitBreaker(failures=1, open_s=1.0, max_open_s=5.0)

    @classmethod
    def from_config(cls, config: ConnectorConfig, fingerprint: ModelFingerprint) -> ConnectorTierClient:
        """A client of the configured tier socket (ConnectorConfigError when none is set). The default
        ``tier_timeout_s`` (3 s) exceeds the tier server's own bound on a remote lookup (2.5 s)."""
        return cls(
            config.socket(),
            cluster_token_from_env(),
            config.tier_timeout_s,
            fingerprint,
            config.tier_load_timeout_s,
            chunk_tokens=config.chunk,
        )

    # TierChunkLookup
    def lookup(self, keys: Sequence[bytes]) -> int:
        """Raises at once while the lookup breaker is open: a dead or hung tier costs vLLM's scheduler thread one
        bounded call per cooldown, not one per request (and a decode leg then falls back at once)."""
        if not keys:
            return 0
        if not self._breaker.try_acquire():
            raise TierUnavailable("tier server unavailable (breaker open)")
        try:
            n = self._client.lookup(keys).n
        except BaseException:
            self._breaker.record_failure()
            raise
        self._breaker.record_success()
        return n

    # TierWorkerClient
    def pool_view(self) -> memoryview:
        """The mapping of the segment named by the tier server we talk to now.

        A restarted tier server has a new segment: offsets it hands out refer to that one, so the mapping follows
        the latest hello (the old mapping stays valid memory for readers that still hold it).
        """
        self._client.connect()
        name = self._client.info.get("segment")
        if name != self._mapped_name or self._view is None:
            self._view = memoryview(attach_segment(name))
            self._mapped_name = name
        return self._view

    LOAD_BATCH = (
        16  # chunks per load call: a slow tier (disk, remote) costs one bounded call, not all of them
    )

    def acquire(self, keys: Sequence[bytes]) -> list[tuple[int, int] | None]:
        """Pin the longest ready prefix of ``keys`` (bringing disk/remote chunks into the pool), batch by batch.

        Each batch is one call bounded by the load timeout; a batch that comes back short ends the prefix there.
        A failed call raises: the client then drops its connection, and the server drops every pin of that
        connection, so chunks pinned by earlier batches are no longer safe to read either.
        """
        out: list[tuple[int, int] | None] = []
        segment = None
        for i in range(0, len(keys), self.LOAD_BATCH):
            batch = keys[i : i + self.LOAD_BATCH]
            r = self._client.call("load", timeout_s=self.load_timeout_s, keys=list(batch))
            if segment is not None and self._client.info.get("segment") != segment:
                # another thread reconnected to a restarted tier between two batches: the earlier offsets
                # belong to the old server's segment
                self._client.release(list(batch[: len(r["locs"])]))
                raise TierUnavailable("tier server restarted during a load")
            segment = self._client.info.get("segment")
            out += [(int(o), int(n)) for o, n in r["locs"]]
            if len(r["locs"]) < len(batch):
                break
        return out + [None] * (len(keys) - len(out))

    def release(self, keys: Sequence[bytes]) -> None:
        self._client.release(keys)

    def alloc(self, keys: Sequence[bytes], nbytes: int) -> list[int | None]:
        """Offsets in the segment last returned by :meth:`pool_view`; TierUnavailable if the server restarted
        since (its offsets would point into a segment the caller has not mapped)."""
        result = self._client.alloc(keys, nbytes)
        if self._mapped_name is not None and self._client.info.get("segment") != self._mapped_name:
            self._client.abort([k for k, a in zip(keys, result.locs, strict=False) if a is not None])
            raise TierUnavailable("tier server restarted: segment changed")
        offsets: list[int | None] = [None if a is None else a.offset for a in result.locs]
        return offsets + [None] * (len(keys) - len(offsets))  # pool full: the rest is not cached

    def commit(self, keys: Sequence[bytes]) -> None:
        self._client.commit(keys)

    def abort(self, keys: Sequence[bytes]) -> None:
        if keys:
            self._client.abort(keys)

    def push(self, keys: Sequence[bytes], peer: str, transfer_id: str, deadline_s: float) -> None:
        self._client.call("push", keys=list(keys), peer=peer, transfer_id=transfer_id, deadline_s=deadline_s)

    def close(self) -> None:
        self._client.close()
