"""Prometheus metrics of both processes, served at /metrics (docs/metrics.md).

Every series is defined here once, in a registry of its own. Labels hold bounded values only:
namespace, node, result, reason, storage, kind; never an object's name or uid.

A terminal phase is counted by the process that writes it, through the one status writer
(status.py): each ContainerCheckpoint and ContainerRestore is counted once in the whole system, and
Prometheus' sum over all processes is exact. With CHECKPOINTER_METRICS_PORT=0 nothing is served and
every recording function returns at once.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from checkpointer.conditions import parse_time
from checkpointer.reasons import FINISHED

if TYPE_CHECKING:
    from checkpointer.archive.spool import SpoolUsage

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)
# Kinds as the label `kind` and the step logs name them, by the plural the API uses.
KINDS = {"containercheckpoints": "checkpoint", "containerrestores": "restore"}

# From a checkpoint of a small process (a fraction of a second) to a large one's upload (an hour).
DURATION_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 3600)
# CRIU keeps a container frozen from milliseconds (small) to minutes (many GiB without pre-copy).
FROZEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
# Archive sizes from 1 MiB to 64 GiB, by powers of four.
SIZE_BUCKETS = tuple(float(2**20 * 4**i) for i in range(9))

CHECKPOINTS = Counter(
    "checkpointer_checkpoints",
    "ContainerCheckpoints that reached a final phase, by result (Succeeded, Failed) and reason.",
    ["namespace", "node", "result", "reason"],
    registry=REGISTRY,
)
RESTORES = Counter(
    "checkpointer_restores",
    "ContainerRestores that reached a final phase, by result (Succeeded, Failed) and reason.",
    ["namespace", "node", "result", "reason"],
    registry=REGISTRY,
)
CHECKPOINT_DURATION = Histogram(
    "checkpointer_checkpoint_duration_seconds",
    "Seconds from a ContainerCheckpoint's start on its node (status.startTime; its creation when it "
    "failed before) to its final phase.",
    ["namespace", "node"],
    buckets=DURATION_BUCKETS,
    registry=REGISTRY,
)
RESTORE_DURATION = Histogram(
    "checkpointer_restore_duration_seconds",
    "Seconds from a ContainerRestore's start on its node (status.startTime; its creation when it "
    "failed before) to its final phase.",
    ["namespace", "node"],
    buckets=DURATION_BUCKETS,
    registry=REGISTRY,
)
FROZEN = Histogram(
    "checkpointer_checkpoint_frozen_seconds",
    "Seconds CRIU kept a checkpointed container frozen (podman's statistics), per archived container.",
    ["node"],
    buckets=FROZEN_BUCKETS,
    registry=REGISTRY,
)
ARCHIVE_SIZE = Histogram(
    "checkpointer_archive_size_bytes",
    "Bytes of each archive a succeeded ContainerCheckpoint stored.",
    ["namespace", "node"],
    buckets=SIZE_BUCKETS,
    registry=REGISTRY,
)
UPLOADED = Counter(
    "checkpointer_uploaded_bytes",
    "Bytes of archive parts the agent uploaded to a storage.",
    ["node", "storage"],
    registry=REGISTRY,
)
DOWNLOADED = Counter(
    "checkpointer_downloaded_bytes",
    "Bytes of archive parts the agent downloaded from a storage.",
    ["node", "storage"],
    registry=REGISTRY,
)
STORAGE_AVAILABLE = Gauge(
    "checkpointer_storage_available",
    "1 when the controller's last validation found the CheckpointStorage Available, else 0.",
    ["storage"],
    registry=REGISTRY,
)


class _State:
    enabled = False


def enabled() -> bool:
    return _State.enabled


def serve(port: int, host: str) -> bool:
    """Serve /metrics on host:port from a thread of its own; port 0 turns metrics off. Returns whether on."""
    if port == 0:
        return False
    start_http_server(port, addr=host, registry=REGISTRY)
    _State.enabled = True
    log.info("serving Prometheus metrics at http://%s:%d/metrics", host, port)
    return True


# --- terminal phases (status.py) ---------------------------------------------------------------------


def _seconds_since(timestamp: object) -> float | None:
    then = parse_time(str(timestamp or ""))
    return None if then is None else max(0.0, (datetime.datetime.now(datetime.UTC) - then).total_seconds())


def elapsed(status: Mapping[str, Any], created: object) -> float | None:
    """Seconds since the work started on the node (status.startTime), else since the object's creation."""
    return _seconds_since(status.get("startTime")) if status.get("startTime") else _seconds_since(created)


def frozen_seconds(stats: Mapping[str, Any] | None) -> list[float]:
    """CRIU's frozen time of each container in podman's --print-stats (microseconds), in seconds. Pure."""
    found = []
    for entry in (stats or {}).get("container_statistics") or []:
        criu = entry.get("criu_statistics") or {} if isinstance(entry, dict) else {}
        if isinstance(criu, dict) and isinstance(criu.get("frozen_time"), int | float):
            found.append(float(criu["frozen_time"]) / 1e6)
    return found


def finished(
    plural: str, namespace: str, node: str, result: str, reason: str, status: Mapping[str, Any], seconds: float | None
) -> None:
    """Count a final phase just written, with what its status says of the run."""
    if not _State.enabled:
        return
    if plural == "containerrestores":
        RESTORES.labels(namespace, node, result, reason).inc()
        if seconds is not None:
            RESTORE_DURATION.labels(namespace, node).observe(seconds)
        return
    CHECKPOINTS.labels(namespace, node, result, reason).inc()
    if seconds is not None:
        CHECKPOINT_DURATION.labels(namespace, node).observe(seconds)
    if result != "Succeeded":
        return
    for archive in status.get("archives") or []:
        if isinstance(archive.get("size"), int):
            ARCHIVE_SIZE.labels(namespace, node).observe(archive["size"])
        for frozen in frozen_seconds(archive.get("stats")):
            FROZEN.labels(node).observe(frozen)


# --- bytes moved (agent) -----------------------------------------------------------------------------


def byte_counter(counter: Counter, node: str, storage: str) -> Callable[[int], None]:
    """A callback that adds each part's bytes to `counter`, given the running total after each part.

    The child is looked up once, and the callback runs once per part (megabytes), never per read.
    """
    if not _State.enabled:
        return lambda done: None
    child = counter.labels(node, storage)
    last = [0]
    lock = threading.Lock()

    def advance(done: int) -> None:
        with lock:
            delta, last[0] = done - last[0], max(done, last[0])
        if delta > 0:
            child.inc(delta)

    return advance


# --- storage (controller) ----------------------------------------------------------------------------


def storage_available(storage: str, available: bool) -> None:
    if _State.enabled:
        STORAGE_AVAILABLE.labels(storage).set(1 if available else 0)


def storage_gone(storage: str) -> None:
    if _State.enabled:
        with contextlib.suppress(KeyError):  # never validated by this process
            STORAGE_AVAILABLE.remove(storage)


# --- collected at scrape time ------------------------------------------------------------------------


class InFlight(Collector):
    """checkpointer_objects_in_flight{kind,node}: the controller's view of objects not finished yet,
    told by its handlers when it schedules, sees finished or sees deleted one (no request of its own)."""

    def __init__(self) -> None:
        self._objects: dict[str, tuple[str, str]] = {}
        self._seen: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def seen(self, plural: str, body: Mapping[str, Any], deleted: bool) -> None:
        uid = str(body["metadata"]["uid"])
        phase = (body.get("status") or {}).get("phase")
        with self._lock:
            if deleted or phase in FINISHED:
                self._objects.pop(uid, None)
            else:
                key = self._objects[uid] = (
                    KINDS.get(plural, plural),
                    str((body.get("spec") or {}).get("nodeName") or ""),
                )
                # A (kind, node) seen once stays, at 0 when nothing is in flight there: absent is not zero.
                self._seen.add(key)

    def nodes(self) -> set[str]:
        """The nodes with objects not finished yet."""
        with self._lock:
            return {node for _, node in self._objects.values()}

    def counts(self) -> dict[tuple[str, str], int]:
        with self._lock:
            values = list(self._objects.values())
        counts: dict[tuple[str, str], int] = {}
        for key in values:
            counts[key] = counts.get(key, 0) + 1
        return counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "checkpointer_objects_in_flight",
            "ContainerCheckpoints and ContainerRestores not in a final phase, by kind and node.",
            labels=["kind", "node"],
        )
        counts = self.counts()
        with self._lock:
            seen = sorted(self._seen)
        for kind, node in seen:
            count = counts.get((kind, node), 0)
            family.add_metric([kind, node], count)
        yield family


class AgentsUp(Collector):
    """checkpointer_agent_up{node}: 1 for each Node whose agent Lease is fresh, 0 for the others.

    `read` returns (every Node's name, the nodes with a fresh Lease): two list requests, made at
    most once per `cache_seconds` and only when Prometheus scrapes.
    """

    def __init__(self, read: Callable[[], tuple[Iterable[str], set[str]]], cache_seconds: float = 5.0) -> None:
        self._read = read
        self._cache_seconds = cache_seconds
        self._last: tuple[float, dict[str, int]] = (0.0, {})
        self._lock = threading.Lock()

    def values(self) -> dict[str, int]:
        with self._lock:
            at, values = self._last
            if time.monotonic() - at < self._cache_seconds:
                return values
            try:
                nodes, live = self._read()
                values = {node: int(node in live) for node in nodes}
            except Exception as e:  # a scrape shows the last values; the next one asks again
                log.warning("could not read the Nodes and agent Leases for checkpointer_agent_up: %s", e)
                return values
            self._last = (time.monotonic(), values)
            return values

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "checkpointer_agent_up",
            "1 when the node's checkpointer agent renews its Lease, 0 when the Lease is missing or expired.",
            labels=["node"],
        )
        for node, up in sorted(self.values().items()):
            family.add_metric([node], up)
        yield family


class Spool(Collector):
    """checkpointer_spool_bytes{node} and checkpointer_spool_free_bytes{node}, read at scrape time."""

    def __init__(self, node: str, usage: Callable[[], SpoolUsage]) -> None:
        self._node = node
        self._usage = usage

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            usage = self._usage()
        except OSError as e:
            log.warning("could not measure the spool for checkpointer_spool_bytes: %s", e)
            return
        used_family = GaugeMetricFamily(
            "checkpointer_spool_bytes", "Bytes the agent's spool holds on the node.", labels=["node"]
        )
        used_family.add_metric([self._node], usage.used_bytes)
        free_family = GaugeMetricFamily(
            "checkpointer_spool_free_bytes",
            "Bytes the spool may still take on the node: its filesystem's free space, within its cap.",
            labels=["node"],
        )
        free_family.add_metric([self._node], usage.room)
        yield used_family
        yield free_family


def register(collector: Collector) -> None:
    if _State.enabled:
        REGISTRY.register(collector)
