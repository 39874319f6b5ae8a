"""The tier server a push-mode worker runs beside its vLLM engine (one per node), and the chunk size it needs.

:class:`TierProcess` owns a ``pdmesh tier-server`` subprocess (a :class:`pdmesh.procs.ManagedProcess`): it waits
for the server's ready line (``pdmesh.kvcache.ready_line``) in its log, and :meth:`TierProcess.stop` stops it (the pool's
shared-memory segment is unlinked by the server on exit).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pdmesh.kvcache.ready_line import parse_ready_line
from pdmesh.procs import ManagedProcess

log = logging.getLogger("pdmesh.worker")

_DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "fp8": 1}


def chunk_nbytes_for_model(model_dir: str, dtype: str, chunk_tokens: int, tp_size: int = 1) -> int | None:
    """Bytes of one KV chunk (all layers, K and V) of a standard decoder in ``model_dir``, or of one tensor-parallel
    rank's part of it when ``tp_size`` > 1 (its KV heads: ``kv_heads / tp_size``, at least one, as vLLM replicates
    them when there are fewer heads than ranks); None if unknown."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    cfg = cfg.get("text_config", cfg)
    try:
        layers = int(cfg["num_hidden_layers"])
        heads = int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError):
        return None
    if dtype == "auto":
        dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
    width = _DTYPE_BYTES.get(dtype.removeprefix("torch."), 2)
    if tp_size > 1:
        kv_heads = max(1, kv_heads // tp_size)
    return layers * 2 * kv_heads * head_dim * chunk_tokens * width


def tier_http_port(requested: int, vllm_port: int) -> int:
    """The tier HTTP port: ``requested`` when >= 0 (0 = any free port), else the vLLM port + 1000 (0 when that
    is not a valid port)."""
    if requested >= 0:
        return requested
    port = vllm_port + 1000
    return port if 0 < port < 65536 else 0


def tier_log_path(run_dir: str | os.PathLike, worker_id: str) -> str:
    """Where a worker's tier server logs (and prints its ready line) when no log file is given."""
    return os.path.join(run_dir, f"pdmesh-{worker_id}-tier.log")


def read_ready_info(log_path: str | os.PathLike) -> dict | None:
    """The tier server's ready line info from its log, or None when it is not there (yet)."""
    try:
        lines = Path(log_path).read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        info = parse_ready_line(line)
        if info is not None:
            return info
    return None


@dataclass
class TierSettings:
    socket_path: str
    pool_bytes: str = "256MiB"
    slot_bytes: int | None = None  # default: the model's chunk size
    chunk_tokens: int | None = None  # the connector's chunk size: /lookup by token ids must cut chunks alike
    transfer_host: str = "127.0.0.1"
    advertise_host: str = "127.0.0.1"
    http_host: str = "127.0.0.1"
    http_port: int = 0  # 0: any free port


class TierProcess:
    def __init__(self, settings: TierSettings, log_path: str) -> None:
        self.settings = settings
        self.log_path = log_path
        argv = [
            sys.executable, "-m", "pdmesh.cli", "tier-server",
            "--socket", settings.socket_path,
            "--host", settings.http_host,
            "--http-port", str(settings.http_port),
            "--pool-bytes", settings.pool_bytes,
            "--transfer-port", "0",
            "--transfer-host", settings.transfer_host,
            "--advertise-host", settings.advertise_host,
        ]  # fmt: skip
        if settings.slot_bytes:
            argv += ["--slot-bytes", str(settings.slot_bytes)]
        if settings.chunk_tokens:
            argv += ["--chunk-tokens", str(settings.chunk_tokens)]
        Path(log_path).write_bytes(b"")
        self.process = ManagedProcess("tier-server", argv, env=dict(os.environ), log_path=log_path)
        self.info: dict = {}

    def wait_ready(self, timeout: float = 60.0) -> dict:
        """Block until the ready line appears; returns {socket, http, segment, pid, transfer}."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.process.alive():
                raise RuntimeError(
                    f"tier server exited with code {self.process.poll()} (log: {self.log_path})"
                )
            info = read_ready_info(self.log_path)
            if info is not None:
                self.info = info
                return info
            time.sleep(0.1)
        raise TimeoutError(f"tier server not ready after {timeout:.0f}s (log: {self.log_path})")

    def stop(self) -> None:
        self.process.stop(10)
