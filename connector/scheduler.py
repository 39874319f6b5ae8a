"""Scheduler half of the pdmesh connector: which chunks to load and save, per request, per step.

Runs on vLLM's scheduler thread; never touches KV memory. The only I/O is :meth:`TierChunkLookup.lookup` (one
bounded-time RPC to the local tier server per new request, and per poll while a PD transfer is in flight).

Rules (see docs/kvcache.md, "Chunk keys", and docs/connector.md):
- A chunk is ``chunk_tokens`` tokens = whole blocks. Only full chunks are stored or loaded. At least the last
  prompt token is always recomputed (vLLM needs logits), so loads stop at ``(len(prompt) - 1) // C`` chunks.
- Loads start where vLLM's own prefix cache stopped, and only at a chunk boundary.
- PD roles are decided per request from ``kv_transfer_params.pdmesh`` (:mod:`pdmesh.connector.params`): the
  prefill leg follows :class:`pdmesh.prefiller.push.PushPlan` (what to save and push, to whom), the decode leg
  :class:`pdmesh.decoder.wait.PushWait` (poll, ``get_num_new_matched_tokens`` -> None, until the pushed chunks
  are ready or the deadline passes; then load what is ready and compute the rest).
- Identity (:mod:`pdmesh.connector.identity`): keys chain the request's LoRA adapter, ``cache_salt`` and
  multimodal inputs besides its tokens; a request whose identity cannot be keyed (prompt embeddings, an image
  without a content hash) is a skip: it loads, saves, pushes and waits for nothing (``SchedulerStats.skipped``).
- Saves: every full chunk whose KV is complete after a step (prompt; and generated tokens when
  ``save_generated``), once per request.
- Shards (an engine over several tensor ranks or pipeline stages): keys here are chunk keys; each worker process
  saves, pushes and loads its part under its shard key (:func:`pdmesh.connector.metadata.for_shard`), and a chunk
  counts as ready only when the tier holds every shard's part (one lookup of all of them, chunk by chunk).
- Device landing (a decode worker with the device path on, connector/device_landing.py): ``landed`` says which
  chunks landed in the worker's device staging region; the leading run of them after the tier's ready prefix
  counts as ready too (no I/O: the worker half's landing, in this process). Without it (or with vLLM's worker in
  another process) landed chunks count once their host copy is in the tier.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from vllm.logger import init_logger

from pdmesh.connector.identity import identity_of
from pdmesh.connector.metadata import ChunkOp, PdmeshConnectorMetadata
from pdmesh.connector.params import PdParams, SeenGrants
from pdmesh.connector.stats import PdmeshKVConnectorStats, StatsInterval, counts_of
from pdmesh.decoder.wait import PushWait
from pdmesh.kvcache.keys import InputIdentity, every_shard_keys
from pdmesh.prefiller.push import PushPlan

log = init_logger("pdmesh.connector")

# A decode leg waiting for pushed chunks asks its tier at most this often. vLLM asks the connector on every engine
# step (a tight loop when nothing else runs); pushes land in chunks of milliseconds.
PD_POLL_S = 0.002


class TierChunkLookup(Protocol):
    def lookup(self, keys: Sequence[bytes]) -> int:
        """How many leading ``keys`` are ready in the local tier (fetching from slower tiers as needed).

        Raises an exception when the tier is unreachable: the caller then treats it as 0 hits.
        """
        ...


@dataclass
class _Req:
    request: Any  # vllm.v1.request.Request (live object: all_token_ids grows as tokens are sampled)
    push: PushPlan | None  # prefill leg of a push PD request
    wait: PushWait | None  # decode leg of a push PD request
    identity: InputIdentity | None  # None: a skip (the request's KV cannot be keyed)
    keys: list[bytes] = field(default_factory=list)
    parts: list[bytes] = field(default_factory=list)  # every shard's key of keys[: len(parts) // shards]
    block_ids: list[int] = field(default_factory=list)
    load_range: tuple[int, int] | None = None  # chunk indexes [a, b) to load this step
    saved: int = 0  # chunks [0, saved) were saved (or loaded, or are not to be saved)
    done_tokens: int = 0  # tokens whose KV exists after the current step
    next_poll: float = 0.0  # decode leg waiting for pushed chunks: no tier lookup before this time


@dataclass
class SchedulerStats:
    """The scheduler half's lifetime counts. vLLM sees their growth per engine step through
    :meth:`ConnectorScheduler.take_stats` (connector/stats.py): ``vllm:pdmesh_<field>_total``, and ``skipped`` as
    ``vllm:pdmesh_skipped_requests_total{reason=...}``."""

    lookups: int = 0
    lookup_errors: int = 0
    hit_tokens: int = 0
    pd_waits: int = 0
    pd_fallbacks: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # requests not keyed (no load/save/push), by reason


class ConnectorScheduler:
    def __init__(
        self,
        tier: TierChunkLookup,
        key_fn: Callable[[Sequence[int], int, InputIdentity], list[bytes]],
        chunk_tokens: int,
        block_size: int,
        save_generated: bool,
        clock: Callable[[], float] = time.monotonic,
        token: str = "",
        landed: Callable[[Sequence[bytes]], list[bool]] | None = None,
        shards: int = 1,
    ) -> None:
        if chunk_tokens % block_size:
            raise ValueError(f"chunk_tokens {chunk_tokens} must be a multiple of the block size {block_size}")
        if shards > 1 and landed is not None:
            raise ValueError("a device landing serves one worker process: not with several shards")
        self.tier = tier
        self.key_fn = key_fn  # (token_ids, n_chunks, identity) -> keys of the first n_chunks full chunks
        self.C = chunk_tokens
        self.blocks_per_chunk = chunk_tokens // block_size
        self.save_generated = save_generated
        self.clock = clock
        self.token = token  # the cluster token: verifies the router's signature on push targets
        self.landed = landed  # keys -> landed in the device landing (never raises, no I/O)
        self.shards = shards  # worker processes holding a part of each chunk (tensor ranks x pipeline stages)
        self.stats = SchedulerStats()
        self._reqs: dict[str, _Req] = {}
        self._grants = SeenGrants()  # push grants honoured by this engine: each is used once
        self._interval = StatsInterval()

    # -- vLLM scheduler hooks ------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        st = self._reqs.get(request.request_id)
        if st is None:
            st = self._track(request)
        prompt = request.prompt_token_ids or []
        limit = (len(prompt) - 1) // self.C
        first = num_computed_tokens // self.C
        st.load_range = None
        if st.identity is None or limit <= 0 or num_computed_tokens % self.C or first >= limit:
            return 0, False
        if st.wait is not None and not st.wait.fell_back and self.clock() < st.next_poll:
            self.stats.pd_waits += 1
            return None, False  # polled less than PD_POLL_S ago: spare the tier a lookup per engine step
        keys = self._keys(st, limit)
        self.stats.lookups += 1
        tier_down = False
        try:
            ready = min(self.tier.lookup(self._parts(st, limit)) // self.shards, limit)
        except Exception as e:  # the tier is an optimisation: unreachable => compute
            self.stats.lookup_errors += 1
            log.warning("tier lookup failed (%s); computing request %s", e, request.request_id)
            ready, tier_down = 0, True
        ready = self._extend_landed(keys, ready, limit)
        if st.wait is not None and not st.wait.fell_back:
            # pushed chunks land in the local tier: with the tier down there is nothing to wait for
            now = self.clock() if not tier_down else st.wait.started_at + st.wait.deadline_s
            if st.wait.decide(ready, limit, now) == "wait":
                self.stats.pd_waits += 1
                st.next_poll = now + PD_POLL_S
                return None, False  # the pushed chunks are still in flight: ask again next step
            if st.wait.fell_back:
                self.stats.pd_fallbacks += 1
                log.warning(
                    "PD transfer %s: %d of %d chunks arrived before the deadline; computing the rest",
                    st.wait.transfer_id,
                    ready,
                    limit,
                )
        if ready <= first:
            return 0, False
        st.load_range = (first, ready)
        if st.wait is not None:
            st.wait.loaded_tokens = ready * self.C
        self.stats.hit_tokens += (ready - first) * self.C
        return (ready - first) * self.C, False

    def update_state_after_alloc(self, request: Any, block_ids: list[int], num_external_tokens: int) -> None:
        st = self._reqs.get(request.request_id)
        if st is None:
            return
        if num_external_tokens <= 0:
            st.load_range = None
        st.block_ids = list(block_ids)

    def build_meta(self, so: Any) -> PdmeshConnectorMetadata:
        meta = PdmeshConnectorMetadata()
        scheduled: list[_Req] = []
        for new in so.scheduled_new_reqs:
            st = self._reqs.get(new.req_id)
            if st is None:
                continue
            st.block_ids = list(new.block_ids[0])
            st.done_tokens = new.num_computed_tokens + so.num_scheduled_tokens.get(new.req_id, 0)
            if st.load_range is not None:
                a, b = st.load_range
                meta.loads.append(
                    ChunkOp(new.req_id, st.keys[a:b], [self._chunk_blocks(st, i) for i in range(a, b)])
                )
                st.load_range = None
                if st.push is None or not st.push.resave_loaded:
                    st.saved = max(st.saved, b)  # loaded chunks are in the tier already
            scheduled.append(st)
        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self._reqs.get(req_id)
            if st is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                st.block_ids = list(new_blocks[0]) if new_blocks else []
            elif new_blocks:
                st.block_ids += new_blocks[0]
            st.done_tokens = cached.num_computed_tokens[i] + so.num_scheduled_tokens.get(req_id, 0)
            scheduled.append(st)
        for st in scheduled:
            op = self._save_op(st)
            if op is not None:
                meta.saves.append(op)
        return meta

    def request_finished(self, request: Any) -> dict[str, Any] | None:
        """Forget the request; for PD requests return what the response's ``kv_transfer_params`` reports."""
        st = self._reqs.pop(request.request_id, None)
        role = None if st is None else (st.push or st.wait)
        return None if role is None else {"pdmesh": role.report()}

    def take_stats(self) -> PdmeshKVConnectorStats | None:
        """What :attr:`stats` counted since the previous call (None: nothing), for vLLM's
        ``get_kv_connector_stats`` on the scheduler side. Call it from the scheduler thread only."""
        return self._interval.take(counts_of(self.stats))

    def active_requests(self) -> int:
        return len(self._reqs)

    # -- helpers -------------------------------------------------------------------------------------
    def _track(self, request: Any) -> _Req:
        identity = identity_of(request)
        if isinstance(identity, str):  # cannot be keyed: neither reuse nor PD for this request
            self.stats.skipped[identity] = self.stats.skipped.get(identity, 0) + 1
            log.info("request %s: no KV reuse or transfer (%s)", request.request_id, identity)
            st = self._reqs[request.request_id] = _Req(request, None, None, None)
            return st
        pd = PdParams.from_request(
            request.kv_transfer_params, self.token, request.prompt_token_ids, self._grants
        )
        push = wait = None
        if pd is not None and pd.push_to:
            push = PushPlan(pd.transfer_id, pd.push_to, pd.deadline_s, pd.push_to_device)
        elif pd is not None:
            wait = PushWait(pd.transfer_id, pd.deadline_s, self.clock())
        st = self._reqs[request.request_id] = _Req(request, push, wait, identity)
        return st

    def _extend_landed(self, keys: list[bytes], ready: int, limit: int) -> int:
        """``ready`` leading chunks are in the tier: extend by the chunks after them that landed on the device."""
        if self.landed is None or ready >= limit:
            return ready
        try:
            marks = self.landed(keys[ready:limit])
        except Exception as e:  # the landing is an optimisation too
            log.warning("device landing lookup failed: %s", e)
            return ready
        for on_device in marks:
            if not on_device:
                break
            ready += 1
        return ready

    def _keys(self, st: _Req, n: int) -> list[bytes]:
        if len(st.keys) < n:
            assert st.identity is not None  # skips never ask for keys
            st.keys = self.key_fn(list(st.request.all_token_ids), n, st.identity)
        return st.keys

    def _parts(self, st: _Req, n: int) -> list[bytes]:
        """What a lookup of the first ``n`` chunks asks the tier: their keys, or with several shards every shard's
        key of each (extended, not recomputed, per poll: a decode leg polls every PD_POLL_S)."""
        if self.shards == 1:
            return st.keys[:n]
        have = len(st.parts) // self.shards
        if have < n:
            st.parts += every_shard_keys(st.keys[have:n], self.shards)
        return st.parts[: n * self.shards]

    def _chunk_blocks(self, st: _Req, chunk: int) -> list[int]:
        a = chunk * self.blocks_per_chunk
        return st.block_ids[a : a + self.blocks_per_chunk]

    def _save_op(self, st: _Req) -> ChunkOp | None:
        if st.identity is None:
            return None
        prompt_len = len(st.request.prompt_token_ids or [])
        limit_tokens = st.done_tokens if self.save_generated else min(st.done_tokens, prompt_len)
        limit = min(limit_tokens, len(st.request.all_token_ids)) // self.C
        limit = min(limit, len(st.block_ids) // self.blocks_per_chunk)
        if limit <= st.saved:
            return None
        keys = self._keys(st, limit)
        a, st.saved = st.saved, limit
        push = st.push.next_push() if st.push is not None else None
        return ChunkOp(
            st.request.request_id, keys[a:limit], [self._chunk_blocks(st, i) for i in range(a, limit)], push
        )
