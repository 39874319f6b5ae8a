"""Fixtures of the fault-injection suite: the e2e fixtures (real vLLM engines, the tiny model) and a private
redis-server that a test can kill and start again on the same port."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import _e2e_env, tiny_model  # noqa: F401 - fixtures re-exported for this folder
from tests.redis_server import RedisProcess


@pytest.fixture(scope="session")
def redis_process(tmp_path_factory):
    r = RedisProcess(str(tmp_path_factory.mktemp("redis-faults"))).start()
    try:
        yield r
    finally:
        r.kill()
