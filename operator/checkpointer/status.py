"""The one way controller and agent write an object's status.

Every write carries the resourceVersion the writer last saw, so two writers cannot clobber each
other: the API server refuses a stale write (409), the writer reads the object again, and writes
again only if the phase is still the one it believes in. If someone else moved the object on (the
controller failed it, it is gone), the writer raises Conflict and the caller stops acting on it.
The answer to every write tells the writer whether the object is being deleted.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

import kopf
from kubernetes.client import ApiException

from checkpointer import GROUP, NODE_LABEL, VERSION, logs, metrics
from checkpointer.adapters.kube import Kube
from checkpointer.conditions import now, phase_patch, set_condition
from checkpointer.models import Metadata
from checkpointer.reasons import ConditionType, Phase, Reason
from checkpointer.ttl import expiration

log = logging.getLogger(__name__)

# The API server may be away for a while (a restart, a leader change of etcd): a phase write waits
# that long for it rather than losing what happened on the node.
WRITE_PATIENCE_SECONDS = 120.0
CONFLICT_RETRIES = 10


class Conflict(Exception):
    """The object moved on without this writer: another phase, or it is gone."""


class StatusWriter:
    """Status writes for one object; progress is written at most once a second."""

    def __init__(self, kube: Kube, plural: str, body: dict[str, Any]) -> None:
        self.kube = kube
        self.plural = plural
        self.namespace = body["metadata"]["namespace"]
        self.name = body["metadata"]["name"]
        # After a wait (a schedule's checkpoint, a retry) the name may belong to an object made anew,
        # which no write meant for the old one may touch: its resourceVersion refuses the write (409),
        # and the read after it stops at another uid, even in the very phase this writer believes in.
        self.uid = str(body["metadata"].get("uid") or "")
        self.label = str((body["metadata"].get("labels") or {}).get(NODE_LABEL) or "")
        self.generation = int(body["metadata"].get("generation", 0))
        # For the final phase's metrics and log line (docs/metrics.md).
        self.node = str((body.get("spec") or {}).get("nodeName") or "")
        self.created = body["metadata"].get("creationTimestamp")
        self.steps = logs.Steps.of(metrics.KINDS.get(plural, plural), body)
        # The object's own ttl: its expiration goes out with the terminal phase, in the same write.
        self.ttl = str((body.get("spec") or {}).get("ttl") or "")
        self.status: dict[str, Any] = {}
        self.resource_version = ""
        self.deleting = False
        self._adopt(body)
        self._last_progress = 0.0
        self._lock = threading.Lock()

    def _adopt(self, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        self.resource_version = str(meta.get("resourceVersion") or "")
        self.deleting = bool(meta.get("deletionTimestamp"))
        self.status = dict(obj.get("status") or {})

    @property
    def phase_now(self) -> str | None:
        return self.status.get("phase")

    def write(self, fields: dict[str, Any], patient: bool = True) -> None:
        """Merge `fields` into status; raises Conflict when the object moved on without us."""
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
        phase = (fresh.get("status") or {}).get("phase")
        if phase != self.phase_now:
            raise Conflict(f"{self.namespace}/{self.name} is {phase} now, not {self.phase_now}")
        self._adopt(fresh)

    def _wait(self, error: Exception, since: float, patient: bool) -> None:
        if not patient or time.monotonic() - since > WRITE_PATIENCE_SECONDS:
            raise error
        log.warning("status of %s/%s not written yet, retrying: %s", self.namespace, self.name, error)
        time.sleep(min(5.0, 0.5 + (time.monotonic() - since) / 4))

    def phase(self, phase: Phase, reason: Reason, message: str, *, scheduled: bool | None = None, **extra: Any) -> None:
        fields = phase_patch(self.status, phase, reason, message, self.generation)
        if scheduled is not None:
            fields["conditions"] = set_condition(
                fields["conditions"], ConditionType.SCHEDULED, scheduled, reason, message, self.generation
            )
        if phase in (Phase.CHECKPOINTING, Phase.DOWNLOADING) and not self.status.get("startTime"):
            fields["startTime"] = now(precise=True)
        if phase.finished and (expires := expiration(str(fields.get("completionTime") or ""), self.ttl)):
            fields["expiration"] = expires
        self.write({**fields, **extra})
        if phase.finished:
            self._finished(phase, reason)

    def _finished(self, phase: Phase, reason: Reason) -> None:
        """This writer wrote the final phase: it alone counts it and logs the total (docs/metrics.md)."""
        seconds = metrics.elapsed(self.status, self.created)
        metrics.finished(self.plural, self.namespace, self.node, str(phase), str(reason), self.status, seconds)
        self.steps.total(str(phase), str(reason), seconds)

    def progress(self, done: int, total: int | None = None, force: bool = False) -> None:
        if not force and time.monotonic() - self._last_progress < 1.0:
            return
        self._last_progress = time.monotonic()
        progress = {"bytesDone": done}
        if total is not None:
            progress["bytesTotal"] = total
        # Progress is informative: a failed write must not fail the checkpoint, nor wait for the API server.
        with contextlib.suppress(Exception):
            self.write({"progress": progress}, patient=False)


def event_subject(kind: str, meta: Metadata) -> kopf.Body:
    """The object an Event is about, for a writer that holds no kopf body of it."""
    raw: kopf.RawBody = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": kind,
        "metadata": {"name": meta.name, "uid": meta.uid},
    }
    if meta.namespace:  # a CheckpointStorage has none
        raw["metadata"]["namespace"] = meta.namespace
    return kopf.Body(raw)
