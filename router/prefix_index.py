"""Router-side index of recent prompts: chunk key -> workers that computed (hence hold) that prefix.

Bounded LRU over chunk keys (``capacity``); each key holds a small set of worker ids. Stale entries (evicted
on the worker, worker gone) only cost a wrong guess, never a wrong answer: the worker recomputes. Synchronous,
O(len(keys)) per call; runs on the event loop.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable


class PrefixIndex:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._keys: OrderedDict[bytes, set[str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def record(self, keys: list[bytes], worker_id: str) -> None:
        """``worker_id`` now holds the prefix ``keys`` (it served a request with this prompt)."""
        for k in keys:
            holders = self._keys.get(k)
            if holders is None:
                self._keys[k] = {worker_id}
            else:
                holders.add(worker_id)
                self._keys.move_to_end(k)
        while len(self._keys) > self.capacity:
            self._keys.popitem(last=False)

    def match(self, keys: list[bytes], worker_ids: Iterable[str]) -> dict[str, int]:
        """For each worker, how many leading ``keys`` it holds (0 when none)."""
        result = dict.fromkeys(worker_ids, 0)
        alive = set(result)
        for i, k in enumerate(keys):
            holders = self._keys.get(k)
            if not holders:
                break
            alive &= holders
            if not alive:
                break
            for wid in alive:
                result[wid] = i + 1
        return result
