"""Child-process entry points for the staging-region tests (spawned; every wait bounded)."""

from __future__ import annotations

import math
import os
import time
from typing import Any

os.environ.setdefault("UCX_NET_DEVICES", "lo")

import torch

from pdmesh.transfer.device_staging import StagingRegion
from pdmesh.transfer.errors import TransferError
from pdmesh.transfer.receiver import Receiver, ReceiverConfig
from pdmesh.transfer.sender import Chunk, Sender, SenderConfig
from tests.transfer._procs import make_backend

SLOT = 64 << 10


def chunk_bytes(seed: int, i: int, nbytes: int) -> torch.Tensor:
    """Chunk ``i`` of a push, reproducible in any process."""
    g = torch.Generator().manual_seed(seed * 1000 + i)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)


def run_staging_receiver(conn: Any, backend: str, fingerprint: str, device: str, slots: int) -> None:
    """A receiver over a staging region on ``device``. Reports its address, then answers ("get", keys, deadline_s) with ("got", {key: bytes}, stats) read
    through acquire/release, and stops on anything else."""
    staging = StagingRegion(SLOT, slots, device)
    rx = Receiver(staging, ReceiverConfig(fingerprint=fingerprint), [make_backend(backend, fingerprint)])
    conn.send(rx.start())
    while conn.poll(120):
        msg = conn.recv()
        if msg[0] != "get":
            break
        _, keys, wait_s = msg
        ready = staging.wait_ready(keys, time.monotonic() + wait_s)
        got = {}
        for k in ready:
            view = staging.acquire(k)
            got[k] = view.cpu().numpy().tobytes()
            staging.release(k)
        conn.send(("got", got, staging.stats()))
    rx.close()
    staging.close()


def run_staging_sender(
    conn: Any, backend: str, fingerprint: str, device: str, address: tuple, seed: int, n: int, nbytes: int
) -> None:
    """Stage ``n`` chunks (``chunk_bytes(seed, i, nbytes)``) in a staging region on ``device`` and push them in
    one push from there. Reports ("ok", backend, written) or ("error", code, message)."""
    staging = StagingRegion(SLOT, n, device)
    chunks = []
    for i in range(n):
        key = b"c%d" % i
        off = staging.alloc(key, nbytes, math.inf)
        staging.view(key).copy_(chunk_bytes(seed, i, nbytes).to(staging.device))
        staging.commit(key)
        chunks.append(Chunk(key, off, nbytes))
    if staging.device.type == "cuda":
        torch.cuda.synchronize(staging.device)
    sender = Sender(
        staging.buffer,
        SenderConfig(fingerprint=fingerprint, backends=(backend,)),
        {backend: lambda: make_backend(backend, fingerprint)},
        region=staging.memory_region,
    )
    try:
        r = sender.push(address, f"stage-{seed}", chunks, time.monotonic() + 20)
        conn.send(("ok", r.backend, len(r.written)))
    except TransferError as exc:
        conn.send(("error", exc.code, str(exc)))
    finally:
        sender.close()
        for c in chunks:
            staging.discard(c.key)
        assert staging.stats().free == n
        staging.close()
