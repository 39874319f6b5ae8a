"""The worker agent behind ``pdmesh prefiller`` and ``pdmesh decoder``.

Lifecycle (blocking, :func:`run_worker`):
1. start one vLLM OpenAI server subprocess with the kv-transfer-config of the role;
2. wait until it is healthy (``--startup-timeout``; exit 1 if it dies or times out);
3. register with every router and heartbeat (:mod:`pdmesh.worker.heartbeat`: ``--router`` may list several, and a
   name resolving to several addresses is one router per address); while a router is unreachable, retry with
   capped exponential backoff and say so in the log (the worker keeps serving whoever reaches it);
4. on SIGTERM/SIGINT: deregister (best effort, 2 s timeout), stop vLLM (SIGTERM, then SIGKILL after 20 s),
   exit 0.
If vLLM exits on its own, the worker deregisters, restarts it with the same command (:class:`EngineWatch`) and
registers again once it is healthy; after more than 5 exits in 15 minutes it exits 2 and says why (``pdmesh up``
or the container runtime then decides). In push mode the node's tier server starts first; if it exits later,
:class:`TierWatch` restarts it with backoff while the worker advertises no tier addresses, so the router sends
it no pushes meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import tempfile

from pdmesh.procs import free_port
from pdmesh.router.registration import WorkerRegistration
from pdmesh.security import cluster_token_from_env, is_loopback, require_token_for_bind, worker_api_key
from pdmesh.worker.cpu_pinning import pin_worker_to_engine_cores
from pdmesh.worker.heartbeat import RouterTargets, heartbeat_until_stopped
from pdmesh.worker.roles import WorkerRole
from pdmesh.worker.served_models import ServedModels
from pdmesh.worker.supervision import CrashLoop, EngineWatch, TierWatch
from pdmesh.worker.tier_process import (
    TierProcess,
    TierSettings,
    chunk_nbytes_for_model,
    tier_http_port,
    tier_log_path,
)
from pdmesh.worker.vllm_process import VLLMServer, VLLMServerSpec, detect_device

log = logging.getLogger("pdmesh.worker")


PD_MODES = ("push", "nixl")
# the device path of pushes (docs/transfer.md, "Device memory"): auto (default: on with CUDA and NIXL), on, off
DEVICE_STAGING_ENV = "PDMESH_DEVICE_STAGING"


def device_path_wanted(device: str, setting: str | None = None) -> tuple[bool, str]:
    """Whether workers run the device path (prefill: pack on the GPU and push from device memory; decode: a
    device landing receiving into device memory), and why. ``setting`` (default ``$PDMESH_DEVICE_STAGING``):
    ``auto``/unset: on only when the device is CUDA and NIXL imports; ``off``: never; ``on``: asked for (the
    connector still leaves it off for caches that are not on CUDA, or without NIXL, and logs why)."""
    value = (os.environ.get(DEVICE_STAGING_ENV, "auto") if setting is None else setting).strip().lower()
    if value in ("0", "off", "false", "no"):
        return False, f"off ({DEVICE_STAGING_ENV}={value})"
    if value in ("1", "on", "true", "yes"):
        return True, f"on ({DEVICE_STAGING_ENV}={value})"
    if device != "cuda":
        return False, f"off: the device is {device}, not CUDA"
    from pdmesh.transfer.nixl_backend import nixl_available

    if not nixl_available():
        return False, "off: NIXL is not installed"
    return True, "on: CUDA and NIXL present"


def kv_transfer_config(
    role: WorkerRole,
    pd_mode: str,
    device: str,
    tier_socket: str | None = None,
    chunk_tokens: int | None = None,
    device_staging: bool = False,
    device_landing: tuple[str, str] | None = None,
) -> dict:
    """The vLLM kv-transfer-config of ``role`` in ``pd_mode``.

    ``push``: the pdmesh connector (``pdmesh.connector``) talking to this node's tier server at ``tier_socket``:
    prompt chunks are saved to the tier (and pushed to the decode node when the router asks), any chunk already
    in the tier is loaded instead of computed. Decoders also save the chunks they generate (multi-turn reuse).
    ``nixl``: stock NixlConnector; the decoder pulls the prompt's blocks from the prefill engine named in the
    request's ``kv_transfer_params``; the prefill engine holds them until pulled or its abort timeout.
    ``device_staging`` (push mode, :func:`device_path_wanted`): the connector's device path; ``device_landing``
    (decoders): (bind "host:port", advertised host) of the receiver into device memory in the vLLM process.
    """
    if pd_mode == "push":
        if not tier_socket:
            raise ValueError("push mode needs the tier server's socket")
        extra: dict = {"tier_socket": tier_socket, "save_generated": role.name == "decode"}
        if chunk_tokens:
            extra["chunk_tokens"] = chunk_tokens
        if device_staging:
            extra["device_staging"] = True
            if device_landing is not None:
                extra["device_landing"], extra["device_landing_advertise_host"] = device_landing
        return {
            "kv_connector": "PdmeshConnector",
            "kv_connector_module_path": "pdmesh.connector.vllm_connector",
            "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": extra,
        }
    if pd_mode != "nixl":
        raise ValueError(f"unsupported pd mode {pd_mode!r}")
    cfg: dict = {"kv_connector": "NixlConnector", "kv_role": role.nixl_kv_role}
    if device == "cpu":
        cfg["kv_buffer_device"] = "cpu"
    return cfg


def add_worker_args(p: argparse.ArgumentParser, role: WorkerRole) -> None:
    p.add_argument("--model", default=None, help="model directory or name (default: the embedded tiny model)")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--router", default=os.environ.get("PDMESH_ROUTER_URL", "http://127.0.0.1:8000"))
    p.add_argument("--host", default="127.0.0.1", help="address vLLM binds to")
    p.add_argument("--port", type=int, default=role.default_port)
    p.add_argument(
        "--advertise-host",
        default=os.environ.get("PDMESH_ADVERTISE_HOST"),
        help="host name the router and peers use to reach this worker (default: --host, or the hostname)",
    )
    p.add_argument(
        "--nixl-port", type=int, default=None, help="NIXL side-channel port (default: a free port)"
    )
    p.add_argument("--pd-mode", default=os.environ.get("PDMESH_PD_MODE", "push"), choices=PD_MODES)
    p.add_argument("--tier-pool-bytes", default=os.environ.get("PDMESH_TIER_POOL_BYTES", "256MiB"))
    p.add_argument(
        "--tier-http-port",
        type=int,
        default=int(os.environ.get("PDMESH_TIER_HTTP_PORT", "-1")),
        help="port of the tier server's HTTP API (default: --port + 1000, e.g. 9100 for a prefiller on 8100; "
        "0: any free port). It is listed in the router's GET /internal/workers and by `pdmesh status`",
    )
    p.add_argument(
        "--chunk-tokens", type=int, default=None, help="tokens per KV chunk (default: the block size)"
    )
    p.add_argument("--worker-id", default=None)
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--log-file", default=None, help="file for vLLM's own output (default: inherit)")
    p.add_argument("vllm_args", nargs=argparse.REMAINDER, help="extra vLLM server args after --")


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _advertised_host(args: argparse.Namespace) -> str:
    """The address peers use to reach this worker.

    Explicit ``--advertise-host`` wins; a specific ``--host`` is used as is; for a wildcard bind (containers)
    it is this host's own address on its network (the IP its hostname maps to), which every container on the
    same network can reach without depending on DNS for container hostnames.
    """
    if args.advertise_host:
        return args.advertise_host
    if args.host not in ("0.0.0.0", "::", ""):
        return args.host
    name = socket.gethostname()
    try:
        return socket.gethostbyname(name)
    except OSError:
        return name


def check_worker_binds(bind_host: str, advertised_host: str, pd_mode: str, token: str) -> None:
    """Refuse (SystemExit with the reason) a worker whose engine would listen beyond loopback without the cluster
    token, in every PD mode: the token is what the engine's API key is derived from (without it the engine
    serves anyone who reaches its port). In ``nixl`` mode vLLM's NIXL side channel also listens, on the
    advertised host, and authenticates no one even with a token: it must stay on a private interface
    (docs/architecture.md, "Security")."""
    require_token_for_bind(bind_host, token, f"pdmesh worker ({pd_mode} mode) vLLM server")
    if pd_mode == "nixl":
        require_token_for_bind(advertised_host, token, "pdmesh worker (nixl mode) NIXL side channel")
        if not is_loopback(advertised_host):
            log.warning(
                "nixl mode: vLLM's NIXL side channel on %s is unauthenticated; keep that interface private "
                "(push mode authenticates every transfer peer)",
                advertised_host,
            )


def run_worker(role: WorkerRole, args: argparse.Namespace) -> int:
    """Run the worker until signalled; returns the process exit code."""
    from pdmesh.modelgen import DEFAULT_MODEL_NAME, ensure_default_model

    model = args.model or str(ensure_default_model())
    served = args.served_model_name or (DEFAULT_MODEL_NAME if args.model is None else args.model)
    device = detect_device()
    host = _advertised_host(args)
    nixl_port = args.nixl_port or free_port()
    extra = [a for a in args.vllm_args if a != "--"]
    worker_id = args.worker_id or f"{role.name}-{host}-{args.port}"
    try:
        routers = RouterTargets(args.router)
    except ValueError as e:
        log.error("--router: %s", e)
        return 2
    try:
        check_worker_binds(args.host, host, args.pd_mode, cluster_token_from_env())
    except SystemExit as e:
        log.error("%s", e)
        return 2
    pin_worker_to_engine_cores(device)  # before any child: the tier and vLLM inherit the cores
    tier: TierProcess | None = None
    server: VLLMServer | None = None
    try:
        tier_socket, chunk_tokens = None, None
        staging, landing, landing_address = False, None, None
        if args.pd_mode == "push":
            tier, chunk_tokens = _start_tier(args, worker_id, model, device, host, extra)
            tier_socket = tier.settings.socket_path
            staging, why = device_path_wanted(device)
            log.info("%s worker: device path %s", role.name, why)
            if staging and role.name == "decode":
                port = free_port()
                landing = (f"{_bracketed(args.host)}:{port}", host)
                landing_address = f"{_bracketed(host)}:{port}"
        spec = VLLMServerSpec(
            model=model,
            host=args.host,
            port=args.port,
            served_model_name=served,
            kv_transfer_config=kv_transfer_config(
                role, args.pd_mode, device, tier_socket, chunk_tokens, staging, landing
            ),
            extra_args=extra,
            env={
                "VLLM_NIXL_SIDE_CHANNEL_HOST": host,
                "VLLM_NIXL_SIDE_CHANNEL_PORT": str(nixl_port),
                # vLLM's OpenAI routes need the key the router derives from the cluster token (in the environment,
                # not on the command line where every local user could read it)
                **({"VLLM_API_KEY": worker_api_key(token)} if (token := cluster_token_from_env()) else {}),
            },
            device=device,
        )
        server = VLLMServer(spec, log_path=args.log_file)
        card = server.wait_healthy(args.startup_timeout)
        engine = EngineWatch(server, lambda: VLLMServer(spec, log_path=args.log_file), args.startup_timeout)
        log.info("%s worker %s: vLLM healthy at %s", role.name, worker_id, server.url)
        reg = WorkerRegistration(
            worker_id=worker_id,
            role=role.name,  # type: ignore[arg-type]
            url=f"http://{host}:{args.port}",
            models=[served],
            max_model_len=card.get("max_model_len"),
            tier_url=tier.info.get("http") if tier else None,
            transfer_address=tier.info.get("transfer") if tier else None,
            device_transfer_address=landing_address,
        )
        watch = None
        if tier is not None:
            watch = TierWatch(
                tier, lambda: _start_tier(args, worker_id, model, device, host, extra, wait=False)[0]
            )
        try:
            key = spec.env.get("VLLM_API_KEY")
            served = ServedModels(
                lambda: engine.server.url, {"Authorization": f"Bearer {key}"} if key else {}
            )
            return asyncio.run(_run_until_signalled(engine, reg, routers, watch, served))
        except CrashLoop as e:
            log.error("%s worker stops: %s", role.name, e)
            return 2
        finally:
            server = engine.server  # the ones running now (either may have been restarted)
            if watch is not None:
                tier = watch.tier
    except (RuntimeError, TimeoutError) as e:
        log.error("%s worker failed to start: %s", role.name, e)
        return 1
    finally:
        if server is not None:
            server.stop()
        if tier is not None:
            tier.stop()


def _start_tier(
    args: argparse.Namespace,
    worker_id: str,
    model: str,
    device: str,
    host: str,
    extra: list[str],
    wait: bool = True,
) -> tuple[TierProcess, int]:
    """Start this node's tier server sized for the model's chunks; returns it and the chunk size in tokens.
    ``wait``: block until it is ready (else the caller calls ``wait_ready``)."""
    block_size = _flag_value(extra, "--block-size")
    chunk_tokens = args.chunk_tokens or int(block_size or (128 if device == "cpu" else 16))
    dtype = _flag_value(extra, "--dtype") or ("float32" if device == "cpu" else "auto")
    tp = _flag_value(extra, "--tensor-parallel-size") or _flag_value(extra, "-tp") or "1"
    slot = chunk_nbytes_for_model(model, dtype, chunk_tokens, int(tp) if tp.isdigit() else 1)  # a rank's part
    run_dir = os.environ.get("PDMESH_RUN_DIR") or tempfile.gettempdir()
    log_path = args.log_file + ".tier" if args.log_file else tier_log_path(run_dir, worker_id)
    settings = TierSettings(
        socket_path=os.path.join(run_dir, f"pdmesh-{worker_id}-{os.getpid()}.sock"),
        pool_bytes=args.tier_pool_bytes,
        http_port=tier_http_port(args.tier_http_port, args.port),
        slot_bytes=slot,
        chunk_tokens=chunk_tokens,
        transfer_host=args.host,
        advertise_host=host,
        http_host=args.host,
    )
    tier = TierProcess(settings, log_path)
    if wait:
        tier.wait_ready(60)
        log.info("tier server ready: %s (chunk %d tokens, %s bytes)", tier.info, chunk_tokens, slot)
    return tier, chunk_tokens


def _flag_value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


async def _run_until_signalled(
    engine: EngineWatch,
    reg: WorkerRegistration,
    router: RouterTargets,
    tier: TierWatch | None = None,
    served: ServedModels | None = None,
) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        return await heartbeat_until_stopped(engine, reg, router, stop, tier, served)
    finally:
        if tier is not None:
            await tier.aclose()
        await engine.aclose()
