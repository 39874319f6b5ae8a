"""How ``bench/bench_gpu.py`` times a row (its module docstring says why): :class:`Timer` (CUDA events around a batch
of back-to-back calls queued behind a spin kernel, so that the events measure device time; wall time on the CPU)
and :func:`kernel_launch` (the Triton launch alone, its arguments already on the device)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

MAX_SPIN_MS = 40.0  # longest spin kernel queued before a timed batch


class Timer:
    """Median seconds per call of a batch of back-to-back calls (see the module doc)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cycles_per_ms = 0.0
        if device.type == "cuda":
            torch.cuda._sleep(1_000)  # load the spin kernel
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            cycles = 5_000_000
            start.record()
            torch.cuda._sleep(cycles)
            end.record()
            end.synchronize()
            self.cycles_per_ms = cycles / max(start.elapsed_time(end), 1e-3)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def per_call(self, calls: list[Callable[[], object]], iters: int, reps: int) -> tuple[float, bool | None]:
        """(median seconds per call, whether host overhead stayed hidden in every batch; None on CPU)."""
        if self.device.type != "cuda":
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                for i in range(iters):
                    calls[i % len(calls)]()
                times.append((time.perf_counter() - t0) / iters)
            return statistics.median(times), None
        self.sync()
        t0 = time.perf_counter()
        for i in range(iters):
            calls[i % len(calls)]()
        enqueue_ms = (time.perf_counter() - t0) * 1e3
        self.sync()
        # Spin long enough for the host to enqueue the batch; double (up to MAX_SPIN_MS) while the GPU still
        # reaches the batch first. Some calls block the host on the GPU (a pageable H2D copy may): then no spin
        # helps, so the remaining batches run without one and the row says host_overhead_hidden=False.
        spin_ms: float | None = min(2 * enqueue_ms + 0.5, MAX_SPIN_MS)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times, hidden_all = [], True
        for _ in range(reps):
            while True:
                if spin_ms is not None:
                    torch.cuda._sleep(int(spin_ms * self.cycles_per_ms))
                start.record()
                for i in range(iters):
                    calls[i % len(calls)]()
                end.record()
                hidden = spin_ms is not None and not start.query()  # GPU had not reached the batch yet
                end.synchronize()
                if hidden or spin_ms is None:
                    break
                if spin_ms >= MAX_SPIN_MS:
                    spin_ms = None  # cannot be hidden: time this and the next batches without a spin
                    break
                spin_ms = min(2 * spin_ms, MAX_SPIN_MS)
            hidden_all &= hidden
            times.append(start.elapsed_time(end) / 1e3 / iters)
        return statistics.median(times), hidden_all

    def call_us(self, call: Callable[[], object], reps: int) -> float:
        """Median host wall time of one call plus synchronize, in microseconds."""
        times = []
        for _ in range(reps):
            self.sync()
            t0 = time.perf_counter()
            call()
            self.sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e6


# ---------------------------------------------------------------------------------------------- one row


def kernel_launch(bound: object, ids: list[int], buf: torch.Tensor, pack: bool) -> Callable[[], None]:
    """The launch ``triton_impl._run`` makes for ``bound`` (same word, tile and grid rules), with the pointer
    table and ids uploaded once: the kernel's own time. The caller checks it writes the same bytes as the API."""
    import triton
    import triton.language as tl

    from pdmesh.kernels import triton_impl

    caches, geo, dev = bound.caches, bound.geometry, bound.device  # type: ignore[attr-defined]
    ptrs = [c.data_ptr() for c in caches]
    word = triton_impl._word_bytes(
        [*ptrs, buf.data_ptr(), geo.block_stride, geo.plane_stride or 8, geo.plane_nbytes]
    )
    table = torch.tensor(ptrs, dtype=torch.int64, device=dev)
    ids_t = torch.tensor(ids, dtype=torch.int64, device=dev)
    plane_words = geo.plane_nbytes // word
    block = min(1024 if dev.type == "cuda" else 256, triton.next_power_of_2(plane_words))
    grid = (len(caches) * geo.num_planes * len(ids), min(triton.cdiv(plane_words, block), 64))
    kernel = triton_impl._kernel(False)  # triton.jit; interpreted under TRITON_INTERPRET=1 (--cpu-smoke)
    word_type = getattr(tl, triton_impl._WORD_TYPES[word])

    def launch() -> None:
        kernel[grid](
            table,
            buf,
            ids_t,
            len(ids),
            geo.block_stride // word,
            geo.plane_stride // word,
            plane_words,
            P=geo.num_planes,
            WORD=word_type,
            BLOCK=block,
            PACK=pack,
        )

    return launch
