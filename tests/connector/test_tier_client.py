"""The connector's tier client: a dead tier costs one bounded call per breaker cooldown, not one per request."""

from __future__ import annotations

import time

import pytest

from pdmesh.connector.tier_client import ConnectorTierClient
from pdmesh.kvcache.client import TierUnavailable
from pdmesh.kvcache.keys import ModelFingerprint


def test_lookups_fail_fast_while_the_tier_is_down(tmp_path):
    c = ConnectorTierClient(
        str(tmp_path / "nothing.sock"), "t", 3.0, ModelFingerprint(model="m", block_size=4)
    )
    calls = []
    real = c._client.lookup

    def counted(keys):
        calls.append(1)
        return real(keys)

    c._client.lookup = counted
    keys = [b"k" * 16]
    with pytest.raises(Exception):  # noqa: B017 - the first call reaches the (missing) tier and fails
        c.lookup(keys)
    t0 = time.monotonic()
    for _ in range(50):
        with pytest.raises(TierUnavailable):
            c.lookup(keys)
    assert len(calls) == 1  # the breaker answered the other 50
    assert time.monotonic() - t0 < 0.5
    c.close()
