"""Same-host shortcut: the sender maps the receiver's pool segment by name and copies once (memmove).

Metadata carries the segment name, its size and the host id; ``connect`` refuses (IncompatiblePeer) a peer on
another host, so the sender falls back to the next backend. The copy runs in ``wait`` in pieces, checking the
deadline between pieces (ctypes.memmove releases the GIL). No notifications: COMMIT on the control connection is
the completion signal. Nothing checks writes on the receiver side: the handshake (token + fingerprint) is the
trust boundary, as for NIXL's one-sided writes.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from pdmesh.transfer import segment as _segment
from pdmesh.transfer.backend import (
    BackendOptions,
    Segment,
    TransferBackend,
    WriteHandle,
    buffer_address,
    check_segments,
    host_id,
    pack_metadata,
    unpack_metadata,
)
from pdmesh.transfer.errors import IncompatiblePeer, PeerUnavailable, TransferTimeout
from pdmesh.transfer.segment import attach_segment, segment_path

PIECE = 32 << 20


@dataclass
class _Mapped:
    shm: mmap.mmap
    address: int
    size: int
    refs: int


@dataclass(frozen=True)
class ShmWrite(WriteHandle):
    """A checked batch for ``peer`` (a mapped segment name): :meth:`ShmBackend.wait` does the copy."""

    segments: Sequence[Segment]


class ShmBackend(TransferBackend[ShmWrite]):
    name = "shm"

    def __init__(self, fingerprint: str) -> None:
        super().__init__(fingerprint)
        self._buf: memoryview | None = None
        self._addr = 0
        self._segment: str | None = None
        self._peers: dict[str, _Mapped] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_options(cls, options: BackendOptions) -> ShmBackend:
        """Uses ``options.fingerprint`` only."""
        return cls(options.fingerprint)

    @classmethod
    def available(cls) -> bool:
        """The shared-memory directory (``/dev/shm``) exists."""
        return os.path.isdir(_segment.SHM_DIR)

    def register_memory(self, buffer: memoryview, segment_name: str | None = None) -> None:
        self._buf = buffer
        self._addr = buffer_address(buffer)
        self._segment = segment_name

    def local_metadata(self) -> bytes:
        if self._buf is None or not self._segment:
            raise IncompatiblePeer("shm backend needs a named shared-memory segment")
        try:
            st = os.stat(segment_path(self._segment))
        except (OSError, ValueError) as exc:
            raise IncompatiblePeer(f"shm backend: segment {self._segment} not usable: {exc}") from exc
        return pack_metadata(
            self.name,
            self.fingerprint,
            {
                "segment": self._segment,
                "size": self._buf.nbytes,
                "host": host_id(),
                # the segment file's identity: a peer on another host (another /dev/shm) cannot match it by
                # echoing our host id; it is checked against the file the sender itself finds under that name
                "file": [st.st_dev, st.st_ino],
            },
        )

    def connect(self, peer_metadata: bytes) -> str:
        md = unpack_metadata(peer_metadata, self.name, self.fingerprint)
        seg = md.get("segment")
        try:
            path = segment_path(seg) if isinstance(seg, str) else None  # the one check of peer segment names
        except ValueError:
            path = None
        if path is None:
            raise IncompatiblePeer(f"shm peer named an invalid segment {seg!r}")
        if md.get("host") != host_id():
            raise IncompatiblePeer("shm peer is on another host")
        try:
            st = os.stat(path)
        except OSError:
            raise IncompatiblePeer("shm peer's segment is not on this host") from None
        if md.get("file") != [st.st_dev, st.st_ino]:
            raise IncompatiblePeer("shm peer did not prove it shares this host's /dev/shm")
        with self._lock:
            m = self._peers.get(seg)
            if m is None:
                try:
                    shm = attach_segment(seg)
                except OSError as exc:
                    raise PeerUnavailable(f"cannot map segment {seg}: {exc}") from exc
                if len(shm) < int(md["size"]):
                    shm.close()
                    raise IncompatiblePeer(f"segment {seg} smaller than advertised")
                m = _Mapped(shm, buffer_address(memoryview(shm)), int(md["size"]), 0)
                self._peers[seg] = m
            m.refs += 1
        return seg

    def write(self, peer: str, segments: Sequence[Segment], notif: bytes) -> ShmWrite:
        m = self._peers.get(peer)
        if m is None or self._buf is None:
            raise PeerUnavailable(f"shm peer {peer} not connected")
        check_segments(segments, self._buf.nbytes, m.size)
        return ShmWrite(peer, segments)

    def wait(self, handle: ShmWrite, deadline: float) -> None:
        m = self._peers.get(handle.peer)
        if m is None:
            raise PeerUnavailable(f"shm peer {handle.peer} disconnected")
        for s in handle.segments:
            done = 0
            while done < s.length:
                if time.monotonic() > deadline:
                    raise TransferTimeout("shm copy passed its deadline")
                n = min(PIECE, s.length - done)
                ctypes.memmove(m.address + s.remote_offset + done, self._addr + s.local_offset + done, n)
                done += n

    def disconnect(self, peer: str) -> None:
        with self._lock:
            m = self._peers.get(peer)
            if m is None:
                return
            m.refs -= 1
            if m.refs <= 0:
                del self._peers[peer]
                m.shm.close()

    def close(self) -> None:
        with self._lock:
            for m in self._peers.values():
                m.shm.close()
            self._peers.clear()
        self._buf = None
