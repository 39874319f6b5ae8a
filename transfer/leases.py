"""Leases: when a region the receiver allocated to a push may be written, committed and reused (docs/transfer.md,
"Leases and failures"). :class:`pdmesh.transfer.receiver.Receiver` keeps one :class:`Lease` per transfer
in flight, under its lock, and applies these rules:

* ALLOC gives every region a lease ending at ``now + lease_ms`` (capped by ``max_lease_s``); the provider is told
  the latest time the receiver could free it (:meth:`Lease.provider_deadline`), so that its own reclaim is only a
  backstop.
* COMMIT (idempotent) before the lease ends makes the chunks ready; after it, the region belongs to the tier.
* ABORT, a closed control connection, or an expired lease never free a region at once: the lease is cut to
  ``now`` and the reaper frees it only after ``grace_s``, and never while a TCP write into it is still running
  (that write is itself bounded by the lease deadline, and admitted only while the lease lives).
* One-sided writes (shm, NIXL: :func:`sees_writes` is False) are not seen by the receiver, so a stalled sender
  (stopped, swapped out, descheduled between its deadline check and its copy) could write after any deadline. A
  lease of a connection offered a one-sided backend is therefore freed only ``grace_s`` after its writer showed
  that it stopped: its own connection sent ABORT (a sender aborts only once its write returned or failed) or
  the peer closed that connection (EOF, reset: its process ended or gave up; not the receiver's own idle
  timeout). Until then an expired lease keeps its regions (``held`` in the receiver's stats), at most
  ``one_sided_hold_s`` past deadline + grace. Residual: only a writer stalled longer than that can still land a
  late write in reused memory (such a lease is freed with a WARNING and counted in ``forced``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pdmesh.transfer.backend import TransferBackend

FREE = "free"
FORCED = "forced"


def sees_writes(backend: TransferBackend) -> bool:
    """Whether the receiving side sees each write of ``backend`` arrive and checks it against the leases (the
    backend installs the write guard: TCP), rather than the sender writing straight into memory (one-sided)."""
    return type(backend).set_write_guard is not TransferBackend.set_write_guard


@dataclass
class Lease:
    transfer_id: str
    conn_id: int
    deadline: float  # writes are admitted, and COMMIT taken, until then (cut to the ABORT/loss time)
    keys: list[bytes] = field(default_factory=list)
    regions: list[tuple[int, int]] = field(default_factory=list)
    writers: int = 0  # TCP writes running now
    cut: bool = False  # aborted / connection lost: free after grace, never commit
    # its connection was offered a backend whose writes the receiver does not see (shm, NIXL)
    one_sided: bool = False
    # when its writer showed it stopped (ABORT on its own connection, or the peer closed that connection)
    stopped: float | None = None
    # a one-sided lease is freed by then even if its writer never showed it stopped
    hold_until: float = math.inf

    @classmethod
    def new(
        cls, tid: str, cid: int, deadline: float, one_sided: bool, grace_s: float, hold_s: float
    ) -> Lease:
        hold_until = deadline + grace_s + hold_s if one_sided else math.inf
        return cls(tid, cid, deadline, one_sided=one_sided, hold_until=hold_until)

    def provider_deadline(self, grace_s: float) -> float:
        """The latest time the receiver may free the lease's regions (for the provider's own reclaim)."""
        return self.hold_until if self.one_sided else self.deadline + grace_s

    def waits_for_writer(self, now: float, grace_s: float) -> bool:
        """Expired, one-sided, and its writer did not show it stopped ``grace_s`` before ``now``."""
        if not self.one_sided or now <= self.deadline + grace_s:
            return False
        return self.stopped is None or now <= self.stopped + grace_s

    def due(self, now: float, grace_s: float) -> str | None:
        """:data:`FREE` when the regions may be reused at ``now``, :data:`FORCED` when only because
        ``hold_until`` passed (the writer never showed it stopped), None while they must be kept."""
        if self.writers or now <= self.deadline + grace_s:
            return None
        if not self.waits_for_writer(now, grace_s):
            return FREE
        return FORCED if now > self.hold_until else None
