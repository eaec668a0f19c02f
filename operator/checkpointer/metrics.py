"""Prometheus metrics of both processes, served at /metrics (docs/metrics.md).

Every series is defined here once, in a registry of its own. Labels hold bounded values only:
namespace, node, result, reason, storage, kind; never an object's name or uid. A node or storage
comes from what a tenant wrote (spec.nodeName, a storageRef), so it is judged against what exists
(Bounds): a node with an agent Lease, a CheckpointStorage; anything else is counted under OTHER. The
series of a node, storage or namespace that is gone are dropped.

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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from checkpointer.conditions import parse_time
from checkpointer.models import Archive, ObjectStatus, node_of
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


# The one value of a label `node`, `storage` or `namespace` for anything this process does not know
# to exist. No node, storage or namespace is named "", so it is never mistaken for one.
OTHER = ""
# Which labels of each series name a node, a storage or a namespace (the order of its labels).
_LABELS: tuple[tuple[MetricWrapperBase, tuple[str, ...]], ...] = (
    (CHECKPOINTS, ("namespace", "node", "result", "reason")),
    (RESTORES, ("namespace", "node", "result", "reason")),
    (CHECKPOINT_DURATION, ("namespace", "node")),
    (RESTORE_DURATION, ("namespace", "node")),
    (FROZEN, ("node",)),
    (ARCHIVE_SIZE, ("namespace", "node")),
    (UPLOADED, ("node", "storage")),
    (DOWNLOADED, ("node", "storage")),
    (STORAGE_AVAILABLE, ("storage",)),
)


@dataclass(frozen=True)
class Existing:
    """What exists, as one process last read it: the values its labels may take.

    nodes: those with an agent (a Lease checkpointer-agent-<node>); storages: the CheckpointStorages;
    namespaces: None where the process cannot list them. An object's namespace is the API server's,
    never free text: it is taken as it is, and the namespaces only tell whose series to drop.
    """

    nodes: frozenset[str]
    storages: frozenset[str]
    namespaces: frozenset[str] | None = None

    def node(self, value: str) -> str:
        return value if value in self.nodes else OTHER

    def storage(self, value: str) -> str:
        return value if value in self.storages else OTHER

    def namespace(self, value: str) -> str:
        return value if self.namespaces is None or value in self.namespaces else OTHER

    def since(self, before: Existing) -> Existing:
        """What a drop must spare. A read races with what is made meanwhile (a namespace, a Lease the
        process has just seen alive): only what is absent from this read and from `before` is gone. Pure."""
        namespaces = (
            None if self.namespaces is None or before.namespaces is None else self.namespaces | before.namespaces
        )
        return Existing(self.nodes | before.nodes, self.storages | before.storages, namespaces)

    def allows(self, labels: Mapping[str, str]) -> bool:
        """Whether a series with these labels names only what exists (or OTHER). Pure."""
        judge = {"node": self.node, "storage": self.storage, "namespace": self.namespace}
        return all(judge[k](v) == v or v == OTHER for k, v in labels.items() if k in judge)


class Bounds:
    """The label values of this process, read by `read` at most every `min_seconds`.

    A value not known is looked up again once the last read is that old (a node's agent came up, a
    storage was made since), so a burst of made-up names costs at most one read per `min_seconds`.
    Every read drops the series of what is gone: absent from it and from the read before.
    """

    def __init__(self, read: Callable[[], Existing], min_seconds: float = 5.0) -> None:
        self._read = read
        self._min_seconds = min_seconds
        self._existing = Existing(frozenset(), frozenset())
        self._read_at: float | None = None
        self._lock = threading.Lock()

    @property
    def existing(self) -> Existing:
        return self._existing

    def refresh(self, force: bool = True) -> Existing:
        """Read what exists now (unless read less than `min_seconds` ago) and drop the series of the gone."""
        with self._lock:
            if not force and self._read_at is not None and time.monotonic() - self._read_at < self._min_seconds:
                return self._existing
            self._read_at = time.monotonic()  # a failed read, too, waits its turn before the next
            try:
                before, self._existing = self._existing, self._read()
            except Exception as e:  # labels keep the last values read; the next refresh asks again
                log.warning("could not read the nodes, storages and namespaces metrics may name: %s", e)
                return self._existing
            prune(self._existing.since(before))
            return self._existing

    def _judged(self, judge: Callable[[Existing], Callable[[str], str]], value: str) -> str:
        if value == OTHER or judge(self._existing)(value) == value:
            return value
        return judge(self.refresh(force=False))(value)

    def node(self, value: str) -> str:
        return self._judged(lambda e: e.node, value)

    def storage(self, value: str) -> str:
        return self._judged(lambda e: e.storage, value)

    def has_agent(self, node: str) -> None:
        """The process has just seen the node's agent Lease alive: name the node before the next read."""
        with self._lock:
            if node not in self._existing.nodes:
                self._existing = replace(self._existing, nodes=self._existing.nodes | {node})


def prune(existing: Existing) -> int:
    """Remove every series that names a node, storage or namespace no longer there; returns how many."""
    removed = 0
    for metric, names in _LABELS:
        children = {
            tuple(sample.labels.get(n, "") for n in names) for family in metric.collect() for sample in family.samples
        }
        for values in children:
            if not existing.allows(dict(zip(names, values, strict=True))):
                with contextlib.suppress(KeyError):  # removed meanwhile
                    metric.remove(*values)
                    removed += 1
    return removed


class _State:
    enabled = False
    # Until a process says what exists, nothing that a tenant names is known: all is OTHER.
    bounds = Bounds(lambda: Existing(frozenset(), frozenset()), min_seconds=float("inf"))


def enabled() -> bool:
    return _State.enabled


def bound(read: Callable[[], Existing], min_seconds: float = 5.0) -> Bounds:
    """Judge this process' labels by what `read` returns from now on, read once at once."""
    bounds = Bounds(read, min_seconds)
    if _State.enabled:
        bounds.refresh()
        _State.bounds = bounds
    return bounds


def refresh() -> None:
    """Read again what exists, and drop the series of what is gone (each process' periodic look)."""
    if _State.enabled:
        _State.bounds.refresh()


def has_agent(node: str) -> None:
    """`node`'s agent Lease was just found alive (the controller scheduled an object there)."""
    if _State.enabled:
        _State.bounds.has_agent(node)


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


def elapsed(start_time: str | None, created: object) -> float | None:
    """Seconds since the work started on the node (status.startTime), else since the object's creation."""
    return _seconds_since(start_time) if start_time else _seconds_since(created)


def frozen_seconds(stats: Mapping[str, Any] | None) -> list[float]:
    """CRIU's frozen time of each container in podman's --print-stats (microseconds), in seconds. Pure."""
    found = []
    for entry in (stats or {}).get("container_statistics") or []:
        criu = entry.get("criu_statistics") or {} if isinstance(entry, dict) else {}
        if isinstance(criu, dict) and isinstance(criu.get("frozen_time"), int | float):
            found.append(float(criu["frozen_time"]) / 1e6)
    return found


def finished(
    plural: str, namespace: str, node: str, result: str, reason: str, archives: Sequence[Archive], seconds: float | None
) -> None:
    """Count a final phase just written, with the archives its status records."""
    if not _State.enabled or plural not in KINDS:
        return  # a ContainerMigration's end is counted by the checkpoint and restore it made
    node = _State.bounds.node(node)
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
    for archive in archives:
        if archive.size is not None:
            ARCHIVE_SIZE.labels(namespace, node).observe(archive.size)
        for frozen in frozen_seconds(archive.stats):
            FROZEN.labels(node).observe(frozen)


# --- bytes moved (agent) -----------------------------------------------------------------------------


def byte_counter(counter: Counter, node: str, storage: str) -> Callable[[int], None]:
    """A callback that adds each part's bytes to `counter`, given the running total after each part.

    The child is looked up once, and the callback runs once per part (megabytes), never per read.
    """
    if not _State.enabled:
        return lambda done: None
    child = counter.labels(_State.bounds.node(node), _State.bounds.storage(storage))
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
    """The validation of a CheckpointStorage just read from the API server: it exists, whatever the last read."""
    if _State.enabled:
        STORAGE_AVAILABLE.labels(storage).set(1 if available else 0)


def storage_gone(storage: str) -> None:
    if _State.enabled:
        with contextlib.suppress(KeyError):  # never validated by this process
            STORAGE_AVAILABLE.remove(storage)


# --- collected at scrape time ------------------------------------------------------------------------


class InFlight(Collector):
    """checkpointer_objects_in_flight{kind,node}: the controller's view of objects not finished yet,
    told by its handlers when it schedules, sees finished or sees deleted one (no request of its own).

    An object's node is its spec.nodeName, as its tenant wrote it (a Pod's checkpoint without one:
    the Pod's node): the series name only nodes with an agent, and count the others under OTHER."""

    def __init__(self) -> None:
        self._objects: dict[str, tuple[str, str]] = {}
        self._seen: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def seen(self, plural: str, body: Mapping[str, Any], deleted: bool) -> None:
        uid = str(body["metadata"]["uid"])
        phase = ObjectStatus.of(body).phase
        known = _State.bounds.existing
        with self._lock:
            if deleted or phase in FINISHED:
                key = self._objects.pop(uid, None)
            else:
                # The node as written: the pickup deadline looks at it (nodes()); collect() judges it.
                key = self._objects[uid] = (
                    KINDS.get(plural, plural),
                    node_of(body),
                )
            # A (kind, node) seen once stays, at 0 when nothing is in flight there: absent is not zero.
            # Only a node with an agent is remembered (its agent may have been found since the object
            # was first seen): what a tenant made up is not kept.
            if key is not None and known.node(key[1]) == key[1]:
                self._seen.add(key)

    def nodes(self) -> set[str]:
        """The nodes with objects not finished yet."""
        with self._lock:
            return {node for _, node in self._objects.values()}

    def counts(self) -> dict[tuple[str, str], int]:
        """Objects in flight by kind and node label."""
        with self._lock:
            values = list(self._objects.values())
        counts: dict[tuple[str, str], int] = {}
        for kind, node in values:
            key = (kind, _State.bounds.node(node))
            counts[key] = counts.get(key, 0) + 1
        return counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "checkpointer_objects_in_flight",
            "ContainerCheckpoints and ContainerRestores not in a final phase, by kind and node.",
            labels=["kind", "node"],
        )
        counts = self.counts()  # judged, reading again what exists when a node is not known
        known = _State.bounds.existing
        with self._lock:
            # A node whose agent is gone is remembered as OTHER; one with objects in flight from now on.
            self._seen = {(kind, known.node(node)) for kind, node in self._seen} | set(counts)
            labels = set(self._seen)
        for kind, node in sorted(labels):
            family.add_metric([kind, node], counts.get((kind, node), 0))
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
