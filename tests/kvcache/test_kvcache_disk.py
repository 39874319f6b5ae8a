from __future__ import annotations

import subprocess
import sys
import time

import pytest

from pdmesh.kvcache.disk import DiskTier
from pdmesh.kvcache.record import HEADER_BYTES


def k(i: int) -> bytes:
    return i.to_bytes(16, "little")


def payload(i: int, n: int = 4096) -> bytes:
    return (i.to_bytes(4, "little") * (n // 4 + 1))[:n]


def test_roundtrip_and_bound(tmp_path):
    d = DiskTier(tmp_path, max_bytes=3 * (4096 + HEADER_BYTES), fsync=False)
    for i in range(5):
        assert d.put(k(i), payload(i), b"f" * 16)
    assert not d.put(k(4), payload(4))  # already present
    s = d.stats()
    assert s.files == 3 and s.used_bytes == 3 * (4096 + HEADER_BYTES) and s.evictions == 2
    assert d.contains([k(0)]) == 0 and d.contains([k(2), k(3), k(4)]) == 3
    out = bytearray(8192)
    assert d.get_into(k(3), out) == 4096 and out[:4096] == payload(3)
    assert d.get(k(4), fingerprint=b"f" * 16) == payload(4)
    # a chunk stored under another fingerprint is never served to this one (but kept for its owner)
    assert d.get(k(2), fingerprint=b"g" * 16) is None
    assert d.stats().corrupt == 0 and d.get(k(2), fingerprint=b"f" * 16) == payload(2)
    assert d.remove(k(2))
    assert d.remove(k(3)) and d.get(k(3)) is None
    assert d.clear() == 1 and d.stats().files == 0


def test_corrupt_files_are_dropped_not_served(tmp_path):
    d = DiskTier(tmp_path, max_bytes=1 << 20, fsync=False)
    for i in range(4):
        d.put(k(i), payload(i))
    files = {i: d._path(k(i)) for i in range(4)}
    raw = bytearray(files[0].read_bytes())
    raw[HEADER_BYTES + 100] ^= 0xFF  # flip a payload bit
    files[0].write_bytes(raw)
    raw = bytearray(files[1].read_bytes())
    raw[10] ^= 0xFF  # header
    files[1].write_bytes(raw)
    with open(files[2], "r+b") as f:  # torn write
        f.truncate(HEADER_BYTES + 10)
    assert d.get(k(0)) is None and d.get(k(1)) is None and d.get(k(2)) is None
    assert d.get(k(3)) == payload(3)
    assert d.stats().corrupt == 3 and not files[0].exists()
    # a restart rebuilds the index from headers and drops bad files it can detect without reading payloads
    raw = bytearray(files[3].read_bytes())
    raw[5] ^= 0xFF
    files[3].write_bytes(raw)
    (d.root / "tmp" / "junk.tmp").write_bytes(b"partial")
    d2 = DiskTier(tmp_path, max_bytes=1 << 20)
    assert d2.stats().files == 0 and d2.stats().corrupt == 1
    assert not list((d2.root / "tmp").iterdir())


_WRITER = """
import sys, time
from pdmesh.kvcache.disk import DiskTier
d = DiskTier(sys.argv[1], max_bytes=1 << 30, fsync=True)
print("go", flush=True)
for i in range(100000):
    d.put(i.to_bytes(16, "little"), (i.to_bytes(4, "little") * 65536))
"""


def test_kill9_during_writes_never_serves_corrupt_chunks(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "go"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(list((tmp_path / "v1").glob("*/*.kv"))) < 8:
            time.sleep(0.05)
        proc.kill()
    finally:
        proc.kill()
        proc.wait(10)
    d = DiskTier(tmp_path, max_bytes=1 << 30)
    n = d.stats().files
    assert n >= 8
    served = 0
    for i in range(n + 50):
        got = d.get(k(i))
        if got is not None:
            assert got == i.to_bytes(4, "little") * 65536
            served += 1
    assert served == n  # every indexed file verifies: torn writes can only be left in tmp/
    assert not list((d.root / "tmp").iterdir())


def test_a_full_filesystem_is_counted_evicted_and_survived(tmp_path):
    """ENOSPC from a volume smaller than max_bytes: logged once, counted, LRU chunks evicted, writes go on."""
    import os
    import shutil
    import subprocess

    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a small tmpfs")
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        d = DiskTier(mnt, max_bytes=64 << 20, fsync=False)  # believes it has 64 MiB; the volume has 1 MiB
        payload = b"x" * (100 << 10)
        results = [d.put(bytes([i]) * 16, payload) for i in range(40)]  # 4 MB into 1 MiB
        st = d.stats()
        assert st.disk_full >= 1 and st.evictions >= 1
        assert results[-1] is True  # still writing after the volume filled up
        assert d.get(bytes([39]) * 16) == payload  # the latest chunk is readable
        assert st.files == len(list((mnt).rglob("*.kv")))  # the index matches what is on disk
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
