"""Whether the node's spool has room for a checkpoint's archives, decided before any container stops. Pure.

An archive holds the container's memory pages (CRIU dumps what the cgroup charges it) and its root
file system's changes (podman's SizeRw). Compression only makes it smaller, so their sum bounds what
the spool receives; for `all`, `latest` or several containers, the sum over all of them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from checkpointer.adapters.podman import Footprint
from checkpointer.archive.spool import SpoolUsage

MiB = 1024 * 1024


@dataclass(frozen=True)
class Estimate:
    """The archives of one checkpoint, estimated from its containers' footprints."""

    memory: int
    rootfs_diff: int

    @property
    def total(self) -> int:
        return self.memory + self.rootfs_diff

    @classmethod
    def of(cls, footprints: Iterable[Footprint]) -> Estimate:
        found = list(footprints)
        return cls(sum(f.memory for f in found), sum(f.rootfs_diff for f in found))


def refusal(estimate: Estimate, usage: SpoolUsage, reserve: int, spool: Path) -> str | None:
    """Why the spool cannot take the archives; None when it can.

    Short when the file system's free space less the reserve (CHECKPOINTER_SPOOL_MIN_FREE_BYTES) is
    below the estimate, or when the spool's usage plus the estimate would pass its cap
    (CHECKPOINTER_SPOOL_MAX_BYTES, 0: none).
    """
    room = usage.free_bytes - reserve
    over_cap = usage.cap_bytes > 0 and usage.used_bytes + estimate.total > usage.cap_bytes
    if room >= estimate.total and not over_cap:
        return None
    cap = (
        f"holds {_mib(usage.used_bytes)} of its {_mib(usage.cap_bytes)} cap (CHECKPOINTER_SPOOL_MAX_BYTES)"
        if usage.cap_bytes
        else f"holds {_mib(usage.used_bytes)} (no cap)"
    )
    return (
        f"the archives are estimated at {_mib(estimate.total)} (memory {_mib(estimate.memory)}, root file system "
        f"changes {_mib(estimate.rootfs_diff)}); the node's spool {spool} has {_mib(usage.free_bytes)} free, "
        f"{_mib(max(0, room))} of it beyond the {_mib(reserve)} reserve (CHECKPOINTER_SPOOL_MIN_FREE_BYTES), "
        f"and {cap}; nothing was checkpointed and the container keeps running"
    )


def _mib(size: int) -> str:
    return f"{size / MiB:.0f} MiB" if size >= 10 * MiB or size == 0 else f"{size / MiB:.1f} MiB"
