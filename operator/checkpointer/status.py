"""The one way controller and agent write an object's status, and the one way they post Events
(post_event: in order, from a thread of its own, so that nobody waits for one).

Every write is a typed status (models.py) of the fields to set, and carries the resourceVersion the
writer last saw, so two writers cannot clobber each other: the API server refuses a stale write
(409), the writer reads the object again, and writes again only if the phase is still the one it
believes in. If someone else moved the object on (the controller failed it, it is gone), the writer
raises Conflict and the caller stops acting on it. The answer to every write tells the writer whether
the object is being deleted. A CheckpointStorage's and a CheckpointSchedule's status have one writer,
the leading controller, and no phase to guard: after a 409 it writes again on the fresh version.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import kopf
from kubernetes.client import ApiException

from checkpointer import NODE_LABEL, logs, metrics
from checkpointer.adapters.kube import CHECKPOINTS, MIGRATIONS, RESTORES, SCHEDULES, STORAGES, Kube
from checkpointer.conditions import now, phase_patch
from checkpointer.models import (
    CheckpointStatus,
    Metadata,
    MigrationStatus,
    PhasedStatus,
    Progress,
    RestoreStatus,
    ScheduleStatus,
    Status,
    StorageStatus,
    node_of,
)
from checkpointer.reasons import Phase, Reason
from checkpointer.ttl import expiration

log = logging.getLogger(__name__)

# The API server may be away for a while (a restart, a leader change of etcd): a phase write waits
# that long for it rather than losing what happened on the node.
WRITE_PATIENCE_SECONDS = 120.0
CONFLICT_RETRIES = 10
# The status of each kind, by plural.
STATUS_OF: dict[str, type[Status]] = {
    CHECKPOINTS: CheckpointStatus,
    RESTORES: RestoreStatus,
    STORAGES: StorageStatus,
    SCHEDULES: ScheduleStatus,
    MIGRATIONS: MigrationStatus,
}


class Conflict(Exception):
    """The object moved on without this writer: another phase, or it is gone."""


class StatusWriter:
    """Status writes for one object; progress is written at most once a second."""

    def __init__(self, kube: Kube, plural: str, body: Mapping[str, Any]) -> None:
        self.kube = kube
        self.plural = plural
        self.model = STATUS_OF[plural]
        self.namespace = str(body["metadata"].get("namespace") or "")  # none: a CheckpointStorage
        self.name = body["metadata"]["name"]
        # After a wait (a schedule's checkpoint, a retry) the name may belong to an object made anew,
        # which no write meant for the old one may touch: its resourceVersion refuses the write (409),
        # and the read after it stops at another uid, even in the very phase this writer believes in.
        self.uid = str(body["metadata"].get("uid") or "")
        self.label = str((body["metadata"].get("labels") or {}).get(NODE_LABEL) or "")
        self.generation = int(body["metadata"].get("generation", 0))
        # For the final phase's metrics and log line (docs/metrics.md).
        self.node = node_of(body)
        self.created = body["metadata"].get("creationTimestamp")
        self.steps = logs.Steps.of(metrics.KINDS.get(plural, plural), body)
        # The object's own ttl: its expiration goes out with the terminal phase, in the same write.
        self.ttl = str((body.get("spec") or {}).get("ttl") or "")
        self.status: Status = self.model()
        self.resource_version = ""
        self.deleting = False
        self._adopt(body)
        self._last_progress = 0.0
        self._lock = threading.Lock()

    def _adopt(self, obj: Mapping[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        self.resource_version = str(meta.get("resourceVersion") or "")
        self.deleting = bool(meta.get("deletionTimestamp"))
        self.status = self.model.of(obj)

    @property
    def phased(self) -> PhasedStatus:
        """The status of a ContainerCheckpoint, ContainerRestore or ContainerMigration, as this writer
        last saw it."""
        if not isinstance(self.status, PhasedStatus):
            raise TypeError(f"{self.plural} have no phase")
        return self.status

    def write(self, patch: Status, patient: bool = True) -> None:
        """Merge the fields `patch` sets into status; raises Conflict when the object moved on without us."""
        if not isinstance(patch, self.model):
            raise TypeError(f"a {type(patch).__name__} is no status of {self.plural}")
        fields = patch.patch()
        with self._lock:
            waited_since = time.monotonic()
            conflicts = 0
            while True:
                try:
                    obj = self.kube.patch_status(self.plural, self.namespace, self.name, fields, self.resource_version)
                except ApiException as e:
                    if e.status == 404:
                        raise Conflict(f"{self.namespace}/{self.name} is gone") from None
                    if e.status == 409 and conflicts < CONFLICT_RETRIES:
                        conflicts += 1
                        self._reread()
                        continue
                    if e.status == 403 and conflicts < CONFLICT_RETRIES and self._relabelled():
                        conflicts += 1
                        # The node's agent may write only objects labelled for its node (the admission
                        # policy), and someone changed the label: the controller puts it back at once.
                        self._wait(e, waited_since, patient)
                        continue
                    if e.status is not None and e.status < 500 and e.status != 429:
                        raise
                    self._wait(e, waited_since, patient)
                    continue
                except Exception as e:  # the connection itself: urllib3's errors are no ApiException
                    self._wait(e, waited_since, patient)
                    continue
                self._adopt(obj)
                return

    def _same_object(self) -> dict[str, Any]:
        """The object as it is now; Conflict when it is gone, or another object took its name."""
        fresh = self.kube.get(self.plural, self.namespace, self.name)
        if fresh is None:
            raise Conflict(f"{self.namespace}/{self.name} is gone")
        uid = str(fresh["metadata"].get("uid") or "")
        if self.uid and uid != self.uid:
            raise Conflict(f"{self.namespace}/{self.name} is gone; one of that name was made anew (uid {uid})")
        return fresh

    def _relabelled(self) -> bool:
        """Whether the object's node label is not the one this writer first saw on it, or was not when
        the write was refused (the object changed since: perhaps the label was put back meanwhile)."""
        if not self.label:
            return False
        try:
            fresh = self._same_object()
        except ApiException:
            return False
        label = (fresh["metadata"].get("labels") or {}).get(NODE_LABEL) or ""
        return bool(label != self.label or fresh["metadata"].get("resourceVersion") != self.resource_version)

    def _reread(self) -> None:
        fresh = self._same_object()
        if isinstance(self.status, PhasedStatus):  # the agent's and the controller's: the phase is guarded
            phase = PhasedStatus.of(fresh).phase
            if phase != self.status.phase:
                raise Conflict(f"{self.namespace}/{self.name} is {phase} now, not {self.status.phase}")
        self._adopt(fresh)

    def _wait(self, error: Exception, since: float, patient: bool) -> None:
        if not patient or time.monotonic() - since > WRITE_PATIENCE_SECONDS:
            raise error
        log.warning("status of %s/%s not written yet, retrying: %s", self.namespace, self.name, error)
        time.sleep(min(5.0, 0.5 + (time.monotonic() - since) / 4))

    def phase(
        self,
        phase: Phase,
        reason: Reason,
        message: str,
        *,
        scheduled: bool | None = None,
        patch: PhasedStatus | None = None,
    ) -> None:
        """Write `phase` with its conditions and times, and the fields `patch` sets, in one write."""
        status = self.phased
        fields = phase_patch(status, phase, reason, message, self.generation, scheduled)
        if phase in (Phase.CHECKPOINTING, Phase.DOWNLOADING) and not status.start_time:
            fields["start_time"] = now(precise=True)
        if phase.finished and (expires := expiration(str(fields.get("completion_time") or ""), self.ttl)):
            fields["expiration"] = expires
        self.write((patch or type(status)()).model_copy(update=fields))
        if phase.finished:
            self._finished(phase, reason)

    def _finished(self, phase: Phase, reason: Reason) -> None:
        """This writer wrote the final phase: it alone counts it and logs the total (docs/metrics.md)."""
        status = self.phased
        seconds = metrics.elapsed(status.start_time, self.created)
        archives = status.archives if isinstance(status, CheckpointStatus) else []
        metrics.finished(self.plural, self.namespace, self.node, str(phase), str(reason), archives, seconds)
        self.steps.total(str(phase), str(reason), seconds)

    def progress(self, done: int, total: int | None = None, force: bool = False) -> None:
        if not force and time.monotonic() - self._last_progress < 1.0:
            return
        self._last_progress = time.monotonic()
        progress = Progress(bytes_done=done, bytes_total=total)
        # Progress is informative: a failed write must not fail the checkpoint, nor wait for the API server.
        with contextlib.suppress(Exception):
            self.write(type(self.phased)(progress=progress), patient=False)


# --- Events --------------------------------------------------------------------------------------

EventType = Literal["Normal", "Warning"]
# Events waiting for the poster at most; beyond, one is dropped with a log line (the API server is away).
EVENT_BACKLOG = 10_000


@dataclass(frozen=True)
class _Event:
    kind: str
    meta: Metadata
    type_: EventType
    reason: str
    message: str


class _Poster:
    """Posts the Events of the process, in order, from a thread of its own: no handler, clock or loop
    waits for the API server to take one, and any thread may post."""

    # The process's one poster, from its start to its cleanup.
    current: ClassVar[_Poster | None] = None

    def __init__(self, kube: Kube, namespace: str) -> None:
        self.kube = kube
        # Where an Event about a cluster-scoped object (a CheckpointStorage) goes: the operator's namespace.
        self.namespace = namespace
        self.backlog: queue.Queue[_Event | None] = queue.Queue(EVENT_BACKLOG)
        self.thread = threading.Thread(target=self._run, name="events", daemon=True)

    def post(self, event: _Event) -> None:
        try:
            self.backlog.put_nowait(event)
        except queue.Full:
            log.warning("Event %s of %s %s dropped: too many waiting", event.reason, event.kind, event.meta.name)

    def stop(self) -> None:
        with contextlib.suppress(queue.Full):
            self.backlog.put_nowait(None)

    def _run(self) -> None:
        while (event := self.backlog.get()) is not None:
            meta = event.meta
            try:
                namespace = meta.namespace or self.namespace
                self.kube.create_event(event.kind, meta, namespace, event.type_, event.reason, event.message)
            except Exception as e:  # ApiException or the connection itself: the log line stays
                log.warning("could not post the Event %s on %s %s: %s", event.reason, event.kind, meta.name, e)


def register_events(registry: kopf.OperatorRegistry, kube: Kube, namespace: str) -> None:
    """Start the poster in the first startup handler of the process, before any Event is due."""
    poster = _Poster(kube, namespace)

    @kopf.on.startup(registry=registry)
    def start_event_poster(**_: Any) -> None:
        _Poster.current = poster
        poster.thread.start()

    @kopf.on.cleanup(registry=registry)
    def stop_event_poster(**_: Any) -> None:
        _Poster.current = None
        poster.stop()


def post_event(kind: str, meta: Metadata, type_: EventType, reason: str, message: str) -> None:
    """The one way either process posts an Event about one of its objects, from any thread; it returns
    at once, and the Event goes out in the background."""
    poster = _Poster.current
    if poster is None:  # no operator running (a unit test): the caller's log line is all
        log.debug("no Event poster: %s %s/%s: %s: %s", kind, meta.namespace, meta.name, reason, message)
        return
    poster.post(_Event(kind, meta, type_, str(reason), message))
