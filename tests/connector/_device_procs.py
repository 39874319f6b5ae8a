"""Child processes for the device-path tests: a prefill side that packs into a staging region and pushes from it
over NIXL, a decode side that receives into its staging region and unpacks into paged caches (spawned)."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

os.environ.setdefault("UCX_NET_DEVICES", "lo")

import torch

from pdmesh.connector.device_path import StagedChunks, staging_receiver, staging_sender
from pdmesh.kernels import BoundKVCaches, bind, get_layout
from pdmesh.transfer.device_staging import StagingRegion
from pdmesh.transfer.errors import TransferError
from pdmesh.transfer.receiver import ReceiverConfig
from pdmesh.transfer.sender import Chunk, SenderConfig
from tests.kernels.kvhelpers import physical_any, random_caches

LAYERS = 3
BLOCKS_PER_CHUNK = 2


class ForcedImpl:
    """Bound caches whose pack/unpack always use one implementation ("torch" or "triton")."""

    def __init__(self, bound: BoundKVCaches, impl: str) -> None:
        self.bound, self.impl, self.device = bound, impl, bound.device

    def chunk_nbytes(self, num_blocks: int) -> int:
        return self.bound.chunk_nbytes(num_blocks)

    def pack(self, block_ids, *, out):
        return self.bound.pack(block_ids, out, impl=self.impl)

    def unpack(self, buf, block_ids):
        self.bound.unpack(buf, block_ids, impl=self.impl)


def make_caches(layout: str, shape: tuple, dtype: str, seed: int, device: str) -> list[torch.Tensor]:
    caches = random_caches(get_layout(layout), shape, getattr(torch, dtype), LAYERS, seed)
    return [c.to(device) for c in caches]


def to_wire(caches: list[torch.Tensor]) -> list[bytes]:
    """Caches as plain bytes (memory order) for a pipe: torch's own tensor pickling shares memory with the
    sending process, which may be gone by the time the parent reads."""
    return [physical_any(c.cpu()).contiguous().view(torch.uint8).numpy().tobytes() for c in caches]


def from_wire(like: list[torch.Tensor], wire: list[bytes]) -> list[torch.Tensor]:
    """Caches shaped like ``like`` (same layout) holding the bytes of :func:`to_wire`."""
    out = [t.clone() for t in like]
    for t, b in zip(out, wire, strict=True):
        physical_any(t).view(torch.uint8).view(-1).copy_(torch.frombuffer(bytearray(b), dtype=torch.uint8))
    return out


def staged(layout: str, caches: list[torch.Tensor], impl: str, slots: int, device: str) -> StagedChunks:
    packer = ForcedImpl(bind(caches, get_layout(layout)), impl)
    staging = StagingRegion(packer.chunk_nbytes(BLOCKS_PER_CHUNK), slots, device)
    return StagedChunks(packer, staging, BLOCKS_PER_CHUNK)


def run_decode(
    conn: Any, fp: str, layout: str, shape: tuple, dtype: str, seed: int, impl: str, device: str
) -> None:
    """Receive into a staging region; on ("unpack", keys, block_ids) wait for the keys (bounded), unpack each
    into ``block_ids[i]`` and answer ("done", unpacked, caches as CPU tensors, free slots)."""
    caches = make_caches(layout, shape, dtype, seed, device)
    st = staged(layout, caches, impl, 8, device)
    rx = staging_receiver(st.staging, ReceiverConfig(fingerprint=fp))
    conn.send(rx.start())
    if conn.poll(120):
        _, keys, block_ids = conn.recv()
        ready = st.staging.wait_ready(keys, time.monotonic() + 30)
        unpacked = [k for k, ids in zip(keys, block_ids, strict=True) if k in ready and st.unpack(k, ids)]
        conn.send(("done", unpacked, to_wire(caches), st.staging.stats().free))
        conn.poll(60)
    rx.close()
    st.staging.close()


def run_prefill(
    conn: Any,
    fp: str,
    layout: str,
    shape: tuple,
    dtype: str,
    seed: int,
    impl: str,
    device: str,
    address: tuple,
    keys: list[bytes],
    block_ids: list[list[int]],
) -> None:
    """Pack each chunk into the staging region, copy it to host memory (the tier's copy, off the push's path),
    push them all in one push from the staging region; answer ("ok", written, host copies) or ("error", ...)."""
    caches = make_caches(layout, shape, dtype, seed, device)
    st = staged(layout, caches, impl, len(keys), device)
    chunks, host = [], []
    for k, ids in zip(keys, block_ids, strict=True):
        off = st.pack(k, ids)
        chunks.append(Chunk(k, off, st.chunk_nbytes))
        out = torch.empty(st.chunk_nbytes, dtype=torch.uint8, pin_memory=device != "cpu")
        host.append((st.copy_to_host(k, out), out))
    sender = staging_sender(st.staging, SenderConfig(fingerprint=fp, backends=("nixl",)))
    try:
        r = sender.push(address, "dev-push", chunks, time.monotonic() + 20)
        for handle, _ in host:
            handle.wait()
        conn.send(("ok", len(r.written), [out.numpy().tobytes() for _, out in host]))
    except TransferError as exc:
        conn.send(("error", exc.code, str(exc)))
    finally:
        sender.close()
        for k in keys:
            st.discard(k)
        st.staging.close()


def run_pool_receiver(conn: Any, fp: str) -> None:
    """A decode tier's receiver as the tier server runs it (host pool, NIXL). Reports its address; answers
    ("get", keys) with {key: bytes} of the committed chunks; stops on anything else."""
    from pdmesh.transfer.nixl_backend import NixlBackend
    from pdmesh.transfer.receiver import Receiver
    from pdmesh.transfer.reference_pool import ReferencePool

    pool = ReferencePool(64 << 10, 16)
    rx = Receiver(pool, ReceiverConfig(fingerprint=fp), [NixlBackend(fp)])
    conn.send(rx.start())
    while conn.poll(120):
        msg = conn.recv()
        if msg[0] != "get":
            break
        got = {}
        for k in msg[1]:
            view = pool.get(k)
            if view is not None:
                got[k] = bytes(view)
                view.release()
        conn.send(got)
    rx.close()
    pool.close()


@contextmanager
def pool_receiver(fp: str) -> Iterator[tuple[str, Any]]:
    """The decode node's tier receiver (host pool, NIXL) in another process: yields (its address, the pipe that
    drives it); stopped, then killed if it does not stop, on exit."""
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=run_pool_receiver, args=(child, fp), daemon=True)
    proc.start()
    try:
        assert conn.poll(120), "receiver did not start"
        host, port = conn.recv()
        yield f"{host}:{port}", conn
        conn.send(("stop",))
        proc.join(30)
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(10)
