"""Small measuring helpers: medians and spreads, process memory, timers, the host's state around a run."""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def memory_kib(pid: int, field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reset_peak(pid: int) -> None:
    """Writing 5 to clear_refs resets the peak RSS (VmHWM) the kernel reports."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@contextmanager
def timer() -> Iterator[Callable[[], float]]:
    start = time.monotonic()
    end: list[float] = []
    yield lambda: (end[0] if end else time.monotonic()) - start
    end.append(time.monotonic())


def spread(values: list[float]) -> dict[str, float]:
    """Minimum, median and maximum: a median alone hides how far one run may land from it."""
    if not values:
        return {"min": float("nan"), "median": float("nan"), "max": float("nan")}
    return {"min": float(min(values)), "median": median(values), "max": float(max(values))}


def meminfo_mib(*fields: str) -> float:
    """The sum of /proc/meminfo fields (e.g. Dirty, Writeback) in MiB."""
    total = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in fields:
            total += int(rest.split()[0])
    return total / 1024


def settle(limit_mib: float = 32, timeout: float = 120, drop_caches: bool = False) -> dict[str, float]:
    """Write back the page cache's dirty pages before a timed run, so that the flusher does not write
    the previous run's files (kernel default: those dirty for 30 s) while this one runs.

    One sync is not always enough: writing back a loop-mounted filesystem dirties its backing file
    again. Dropping caches (root only) also makes the run read its programs and images from disk;
    it is there to tell apart the cost of writeback from that of a warm cache.
    """
    start = time.monotonic()
    before = meminfo_mib("Dirty", "Writeback")
    while True:
        os.sync()
        left = meminfo_mib("Dirty", "Writeback")
        if left <= limit_mib or time.monotonic() - start > timeout:
            break
        time.sleep(0.2)
    if drop_caches:
        Path("/proc/sys/vm/drop_caches").write_text("3")
    return {"dirtyBeforeMiB": before, "dirtyAfterMiB": left, "settleSeconds": time.monotonic() - start}


def wait_quiet(below: float, timeout: float = 60, sample: float = 1.0) -> dict[str, float]:
    """Wait until the host's CPUs are busy less than `below` (a fraction of all of them) over one
    sample: on a two-core host another tenant's burst costs the benchmark's c, which needs both
    cores, far more than its a, which needs one, so c/a measured during it says little.

    Past the timeout the run goes ahead; the busy fraction it started under stays with its figures.
    """
    start = time.monotonic()
    while True:
        busy, total, _ = _cpu_jiffies()
        time.sleep(sample)
        busy2, total2, _ = _cpu_jiffies()
        fraction = (busy2 - busy) / max(total2 - total, 1)
        if fraction < below or time.monotonic() - start > timeout:
            return {"busyBefore": fraction, "quietWaitSeconds": time.monotonic() - start}


def _pressure_seconds(resource: str, kind: str) -> float:
    """Total time (PSI) some or all runnable tasks waited for a resource, since boot, in seconds."""
    try:
        text = Path(f"/proc/pressure/{resource}").read_text()
    except OSError:  # a kernel without PSI
        return float("nan")
    for line in text.splitlines():
        if line.startswith(kind + " "):
            return int(line.rsplit("total=", 1)[1]) / 1e6
    return float("nan")


def _cpu_jiffies() -> tuple[int, int, int]:
    """(busy, all, steal) jiffies of the whole host from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    steal = fields[7] if len(fields) > 7 else 0
    return sum(fields) - idle, sum(fields), steal


@contextmanager
def conditions() -> Iterator[dict[str, float]]:
    """What else was going on while a timed run ran: the load it started under, how busy the CPUs
    were and how long tasks waited for a CPU or for I/O (PSI, as a fraction of the run's time).

    The benchmark's own processes need about two cores at peak, so on a two-core host a waiting
    task is often one of them; a run's cpuWait far above its neighbours' is the sign of another
    tenant, and ioFull of writeback the run did not cause.
    """
    result: dict[str, float] = {"load1": os.getloadavg()[0], "dirtyMiB": meminfo_mib("Dirty", "Writeback")}
    start = time.monotonic()
    cpu_wait, io_full = _pressure_seconds("cpu", "some"), _pressure_seconds("io", "full")
    busy, total, steal = _cpu_jiffies()
    try:
        yield result
    finally:
        took = max(time.monotonic() - start, 1e-9)
        busy2, total2, steal2 = _cpu_jiffies()
        result["cpuBusy"] = (busy2 - busy) / max(total2 - total, 1)
        result["cpuSteal"] = (steal2 - steal) / max(total2 - total, 1)
        result["cpuWait"] = (_pressure_seconds("cpu", "some") - cpu_wait) / took
        result["ioFull"] = (_pressure_seconds("io", "full") - io_full) / took


def _stat_fields(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def tree_cpu_seconds(roots: dict[str, int]) -> dict[str, float]:
    """CPU seconds (user plus system) used so far per role, two ways each: `<role>` is the role's
    process itself (all its threads), `<role>+children` its descendants, living ones as they stand
    and those it (or they) already reaped (cutime, cstime). The difference of two readings is what
    the role used between them, also for a child born and reaped in between (podman, CRIU), which no
    sampling would see. A process reparented away from its role (conmon, a restored container) is
    nobody's, as it should be: it is the workload's, not the move's."""
    tick = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            parents[int(entry.name)] = int(fields[1])
            stats[int(entry.name)] = fields
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    found: dict[str, float] = {}
    for role, root in roots.items():
        own = stats.get(root)
        if own is None:
            continue
        found[role] = (int(own[11]) + int(own[12])) / tick
        below = (int(own[13]) + int(own[14])) / tick  # its reaped descendants
        todo = list(children.get(root, []))
        while todo:
            pid = todo.pop()
            fields = stats[pid]
            below += sum(int(fields[i]) for i in (11, 12, 13, 14)) / tick
            todo.extend(children.get(pid, []))
        found[f"{role}+children"] = below
    return found


def cpu_used(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds per role between two readings of tree_cpu_seconds."""
    return {role: round(after[role] - before.get(role, 0.0), 2) for role in after}
