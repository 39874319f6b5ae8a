"""The pdmesh vLLM KV connector: vLLM's KV goes through the node's tier, so PD transfer and prefix reuse are
one mechanism.

Load it with::

    --kv-transfer-config '{"kv_connector": "PdmeshConnector",
                           "kv_connector_module_path": "pdmesh.connector.vllm_connector",
                           "kv_role": "kv_producer" | "kv_consumer" | "kv_both",
                           "kv_load_failure_policy": "recompute",
                           "kv_connector_extra_config": {"tier_socket": "/run/pdmesh/tier.sock",
                                                         "chunk_tokens": 128, "save_generated": false}}'

vLLM creates one instance per role: the scheduler half (:class:`ConnectorScheduler`: lookups and plans) and the
worker half (:class:`ConnectorWorker`: pack/unpack between vLLM's blocks and the tier's shared-memory pool).
They share nothing but the per-step :class:`PdmeshConnectorMetadata` (and, on a decode worker with the device
path on, the worker half's device landing, which the scheduler half reads when vLLM runs both in one process:
``pdmesh.connector.device_landing.landing_for``). An engine over several tensor ranks or pipeline stages runs one
worker half per worker process, each saving, pushing and loading its own part of a chunk under its shard key
(:func:`pdmesh.connector.metadata.for_shard`); the scheduler half counts a chunk only when every part is in the tier,
and the device path stays off (a landing serves one worker process). Both talk to the local tier server over
its unix socket with bounded timeouts; a tier that is down makes every lookup miss and every save a no-op, so
outputs never change (they are only computed instead of loaded).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from pdmesh.connector.config import ConnectorConfig
from pdmesh.connector.metadata import PdmeshConnectorMetadata, for_shard
from pdmesh.connector.scheduler import ConnectorScheduler
from pdmesh.connector.stats import PdmeshKVConnectorStats, PdmeshPromMetrics, StatsInterval
from pdmesh.connector.tier_client import ConnectorTierClient
from pdmesh.connector.worker import ConnectorWorker
from pdmesh.kvcache.keys import ModelFingerprint, chunk_keys
from pdmesh.security import cluster_token_from_env

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import PromMetric, PromMetricT
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

    from pdmesh.connector.device_landing import DeviceLanding
    from pdmesh.connector.device_push import DevicePush
    from pdmesh.kernels import BoundKVCaches

from vllm.logger import init_logger

log = init_logger("pdmesh.connector")


def engine_layout(vllm_config: VllmConfig, backend_name: str | None = None) -> str:
    """The KV memory layout an engine uses, as one string that goes into the fingerprint: device, cache dtype,
    attention backend, vLLM's resolved KV cache layout (NHD/HND/...; not on CPU, whose backend has one layout)
    and the geometry (KV heads per rank, head size, the model's layers). Two engines whose strings differ never
    share a key, so a pool of another layout (FlashAttention vs FlashInfer, NHD vs HND) never unpacks our chunks
    transposed.

    ``backend_name``: the backend the worker half actually bound; None derives it from the config alone
    (:func:`configured_attn_backend`), which every process of the engine computes alike (the scheduler process
    has no attention layers to ask). Never raises: what cannot be read is ``?``."""
    from vllm.platforms import current_platform

    mc, cc, pc = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    parts = [current_platform.device_type, str(cc.cache_dtype)]
    try:
        parts.append(str(backend_name if backend_name is not None else configured_attn_backend(vllm_config)))
    except Exception as e:
        log.warning("pdmesh connector: attention backend unknown (%s)", e)
        parts.append("?")
    if not current_platform.is_cpu():
        try:
            parts.append(cc.get_resolved_kv_cache_layout().name)
        except Exception:
            parts.append("?")
    try:
        parts += [
            f"kvh{mc.get_num_kv_heads(pc)}",
            f"hd{mc.get_head_size()}",
            f"L{mc.get_total_num_hidden_layers()}",  # the model's (a pipeline stage's own count differs per stage)
        ]
    except Exception:
        parts.append("?")
    return ":".join(parts)


def configured_attn_backend(vllm_config: VllmConfig) -> str:
    """vLLM's choice of attention backend from the config alone (what its selector answers without the model's
    layers): the same in the scheduler process and in every worker process. The worker half refuses to load or
    save when the backend it actually bound differs (the keys would name another layout)."""
    from vllm.config import set_current_vllm_config
    from vllm.v1.attention.selector import get_attn_backend

    mc = vllm_config.model_config
    with set_current_vllm_config(vllm_config):
        backend = get_attn_backend(
            head_size=mc.get_head_size(),
            dtype=mc.dtype,
            kv_cache_dtype=vllm_config.cache_config.cache_dtype,
            use_mla=mc.use_mla,
        )
    return backend.get_name()


def fingerprint_for(vllm_config: VllmConfig) -> ModelFingerprint:
    """The compatibility fingerprint both halves (and every peer) derive from the engine config alone."""
    mc, cc, pc = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    return ModelFingerprint(
        model=str(mc.model),
        revision=str(mc.revision or ""),
        dtype=str(mc.dtype).removeprefix("torch."),
        layout=engine_layout(vllm_config),
        block_size=int(cc.block_size),
        tp_rank=0,  # each worker process's part has its own key: pdmesh.kvcache.keys.shard_key
        tp_size=int(pc.tensor_parallel_size),
        pp_size=int(pc.pipeline_parallel_size),
    )


def shard_of_this_worker(fingerprint: ModelFingerprint) -> int:
    """This worker process's shard (``pp_rank * tp_size + tp_rank``), from vLLM's parallel groups, which vLLM sets
    up before it creates the worker-side connector; 0 for an engine of one shard."""
    if fingerprint.shards <= 1:
        return 0
    from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank

    return get_pp_group().rank_in_group * fingerprint.tp_size + get_tensor_model_parallel_rank()


class PdmeshConnector(KVConnectorBase_V1):
    _cache_hit_source = CacheHitSource.HOST

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None
    ):
        super().__init__(vllm_config, role, kv_cache_config)
        self.block_size = int(vllm_config.cache_config.block_size)
        # validated once, here: a bad key or value stops the engine with every problem named
        self.config = ConnectorConfig.load(
            self._kv_transfer_config.kv_connector_extra_config, self.block_size
        )
        self.chunk_tokens = self.config.chunk
        policy = getattr(self._kv_transfer_config, "kv_load_failure_policy", "recompute")
        if role == KVConnectorRole.SCHEDULER and policy != "recompute":
            log.warning(
                "pdmesh connector: kv_load_failure_policy is %r: a chunk that fails to load (a tier restart, a "
                'refused layout) fails its request; set "kv_load_failure_policy": "recompute" to compute it',
                policy,
            )
        self.fingerprint = fingerprint_for(vllm_config)
        self.tier = ConnectorTierClient.from_config(self.config, self.fingerprint)
        self.shards = self.fingerprint.shards
        self.shard = 0 if role == KVConnectorRole.SCHEDULER else shard_of_this_worker(self.fingerprint)
        self._scheduler: ConnectorScheduler | None = None
        self._worker: ConnectorWorker | None = None
        self._refused = False  # the worker half found another layout than the keys name: no loads or saves
        self._refused_blocks: set[int] = set()
        self._refused_chunks = 0  # planned chunk loads a refused worker half did not do (load errors)
        self._refused_interval = StatsInterval()
        if role == KVConnectorRole.SCHEDULER:
            C = self.chunk_tokens
            self._scheduler = ConnectorScheduler(
                self.tier,
                lambda toks, n, identity: chunk_keys(self.fingerprint, toks[: n * C], C, identity),
                C,
                self.block_size,
                save_generated=self.config.save_generated,
                token=cluster_token_from_env(),
                landed=self._landed_lookup() if self.shards == 1 else None,
                shards=self.shards,
            )
        log.info(
            "pdmesh connector (%s): chunk %d tokens, tier %s, shard %d of %d",
            role.name,
            self.chunk_tokens,
            self.tier.address,
            self.shard,
            self.shards,
        )

    # ---------------------------------------------------------------- worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.platforms import current_platform

        from pdmesh.kernels import bind, layout_for

        first = next(iter(kv_caches.values()))
        if current_platform.is_cpu():
            backend = "CPU_ATTN"
            layout = layout_for(backend, first.shape)
        else:  # CUDA/ROCm: the backend and vLLM's resolved KVCacheLayout name the memory order (not run in CI)
            from vllm.distributed.kv_transfer.kv_connector.utils import get_current_attn_backends

            backend = get_current_attn_backends(self._vllm_config)[0].get_name()
            resolved = self._vllm_config.cache_config.get_resolved_kv_cache_layout().name
            layout = layout_for(backend, first.shape, kv_cache_layout=resolved)
        bound = bind(list(kv_caches.values()), layout)
        actual = engine_layout(self._vllm_config, backend)
        if actual != self.fingerprint.layout:
            # keys were made for another layout: loading them would unpack transposed bytes. Refuse all I/O.
            log.error(
                "pdmesh connector: KV layout in use %r differs from the keyed layout %r; this worker loads and "
                "saves nothing (loads planned by the scheduler are reported as load errors and recomputed)",
                actual,
                self.fingerprint.layout,
            )
            self._refused = True
            return
        blocks_per_chunk = self.chunk_tokens // self.block_size
        self._worker = ConnectorWorker(
            self.tier,
            bound,
            blocks_per_chunk,
            self._device_push(bound, blocks_per_chunk),
            self._device_landing(bound, blocks_per_chunk),
        )
        log.info(
            "pdmesh connector: %d layers, layout %s, %d bytes per chunk",
            len(kv_caches),
            layout.name,
            self._worker.chunk_nbytes,
        )

    def _device_push(self, bound: BoundKVCaches, blocks_per_chunk: int) -> DevicePush | None:
        """The device path for pushes (connector/device_push.py) when ``device_staging`` is on, the caches are on
        CUDA and NIXL imports; else None (pushes go through the host tier pool). Never raises: a device path
        that cannot start is logged and left out."""
        from pdmesh.connector.device_path import DevicePathConfig, device_path_decision

        try:
            cfg = DevicePathConfig.from_config(self.config)
            use, why = device_path_decision(cfg, bound.device)
            if use and self.shards > 1:
                use, why = False, f"off: {self.shards} shards (a device landing serves one worker process)"
            log.info("pdmesh connector: device path %s", why)
            if not use:
                return None
            from pdmesh.connector.device_push import DevicePush

            return DevicePush.build(
                bound,
                blocks_per_chunk,
                cfg.slots,
                self.config.transfer_fingerprint,
                cluster_token_from_env(),
                engine=self.fingerprint.digest().hex(),
            )
        except Exception as e:
            log.warning("pdmesh connector: device path not started (%s); pushes use the host tier pool", e)
            return None

    def _device_landing(self, bound: BoundKVCaches, blocks_per_chunk: int) -> DeviceLanding | None:
        """The decode side of the device path (connector/device_landing.py) when the device path is on and
        ``device_landing`` names the address to bind; else None (pushes land in the host tier pool). Never
        raises: a landing that cannot start is logged and left out (prefill workers then push to the tier)."""
        from pdmesh.connector.device_path import DevicePathConfig, device_path_decision

        try:
            cfg = DevicePathConfig.from_config(self.config)
            if cfg.landing is None or self.shards > 1 or not device_path_decision(cfg, bound.device)[0]:
                return None
            from pdmesh.connector.device_landing import DeviceLanding
            from pdmesh.kvcache.transfer_node import parse_address
            from pdmesh.transfer.receiver import ReceiverConfig

            host, port = parse_address(cfg.landing)
            token = cluster_token_from_env()
            engine = self.fingerprint.digest().hex()
            rx = ReceiverConfig(
                fingerprint=self.config.transfer_fingerprint,
                engine=lambda: engine,
                host=host,
                port=port,
                token=token,
            )
            # its own tier connection: the landing's copy thread must not share the worker half's
            tier = ConnectorTierClient.from_config(self.config, self.fingerprint)
            landing = DeviceLanding.build(
                bound, blocks_per_chunk, cfg.slots, tier, rx, advertise_host=cfg.landing_advertise_host
            )
            address = landing.start(register_as=self.tier.address)
            log.info("pdmesh connector: device landing at %s (%d slots)", address, cfg.slots)
            return landing
        except Exception as e:
            log.warning("pdmesh connector: device landing not started (%s); pushes land in the tier pool", e)
            return None

    def _landed_lookup(self) -> Callable[[Sequence[bytes]], list[bool]] | None:
        """For the scheduler half: which keys landed in this process's device landing (None when the config
        has none; the landing itself starts with the worker half)."""
        from pdmesh.connector.device_path import DevicePathConfig

        cfg = DevicePathConfig.from_config(self.config)
        if not (cfg.enabled and cfg.landing):
            return None
        from pdmesh.connector.device_landing import landed_in_process

        name = self.tier.address
        return lambda keys: landed_in_process(name, keys)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if self._worker is not None and isinstance(meta, PdmeshConnectorMetadata) and meta.loads:
            self._worker.load(for_shard(meta, self.shard, self.shards))
        elif self._refused and isinstance(meta, PdmeshConnectorMetadata):
            self._refused_blocks.update(b for op in meta.loads for blocks in op.block_ids for b in blocks)
            self._refused_chunks += sum(len(op.keys) for op in meta.loads)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None  # loads complete in start_load_kv

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        return None  # whole chunks (all layers) are saved in wait_for_save

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        if self._worker is not None and isinstance(meta, PdmeshConnectorMetadata) and meta.saves:
            self._worker.save(for_shard(meta, self.shard, self.shards))

    def get_block_ids_with_load_errors(self) -> set[int]:
        if self._refused:
            out, self._refused_blocks = self._refused_blocks, set()
            return out
        return self._worker.take_load_errors() if self._worker is not None else set()

    # ---------------------------------------------------------------- stats (both sides)
    def get_kv_connector_stats(self) -> PdmeshKVConnectorStats | None:
        """What this instance's half counted since vLLM's previous call; None when nothing (connector/stats.py).

        vLLM 0.32 calls it on both sides once per engine step: the worker-side instance's result rides the model
        runner output to the scheduler (summed over the engine's worker processes), the scheduler-side instance's
        is added to it there, and the sum reaches the API server's ``/metrics`` (``vllm:pdmesh_*``, see
        :meth:`build_prom_metrics`) and its ``KV Transfer metrics`` log line. Never raises, does no I/O."""
        try:
            if self._scheduler is not None:
                return self._scheduler.take_stats()
            if self._worker is not None:
                return self._worker.take_stats()
            if self._refused:
                return self._refused_interval.take({"load_errors": self._refused_chunks})
        except Exception as e:  # stats must never stop an engine step
            log.warning_once("pdmesh connector: stats not collected (%s)", repr(e))  # once per distinct error
        return None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> PdmeshKVConnectorStats:
        """The stats object for ``data`` (a ``PdmeshKVConnectorStats.to_dict()`` that crossed processes), or an
        empty one; vLLM's logging stat logger sums these over its log interval."""
        return PdmeshKVConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> PdmeshPromMetrics:
        """The ``vllm:pdmesh_*`` counters (:class:`pdmesh.connector.stats.PdmeshPromMetrics`), registered once by
        vLLM's Prometheus stat logger in the process that serves ``/metrics``."""
        return PdmeshPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self._worker is not None and self._worker.device_push is not None:
            self._worker.device_push.close()
        if self._worker is not None and self._worker.landing is not None:
            self._worker.landing.close()
        self.tier.close()

    # ---------------------------------------------------------------- scheduler side
    def on_new_request(self, request: Request) -> None:
        """Untrusted input guard: vLLM's own scheduler reads ``request.kv_transfer_params`` as a dict right after
        this hook (``.get("do_remote_prefill")``); anything else (e.g. a string smuggled in through
        ``vllm_xargs``) would raise there and kill the engine. It is dropped here, with a log line."""
        params = request.kv_transfer_params
        if params is not None and not isinstance(params, dict):
            log.warning(
                "request %s: ignoring kv_transfer_params of type %s (not an object)",
                request.request_id,
                type(params).__name__,
            )
            request.kv_transfer_params = None

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        assert self._scheduler is not None
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def get_external_cache_hit_sources(
        self, request: Request, num_external_tokens: int
    ) -> dict[CacheHitSource, int]:
        if num_external_tokens <= 0:
            return {}
        params = (request.kv_transfer_params or {}).get("pdmesh")
        source = (
            CacheHitSource.P2P
            if isinstance(params, dict) and not params.get("push_to")
            else CacheHitSource.HOST
        )
        return {source: num_external_tokens}

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        assert self._scheduler is not None
        self._scheduler.update_state_after_alloc(
            request, list(blocks.get_block_ids()[0]), num_external_tokens
        )

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self._scheduler is not None
        return self._scheduler.build_meta(scheduler_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self._scheduler is not None
        return False, self._scheduler.request_finished(request)
