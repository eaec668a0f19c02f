"""The controller's one clock for TTLs: finished objects are deleted once their expiration has passed.

One thread and one heap for every finished object, instead of a timer or a task per object: a
cluster keeps thousands of finished checkpoints, and each costs here a heap entry, not a wake-up.
The watch feeds the clock (observe), so a restarted controller learns every expiration again from
its first listing. Deleting goes through the API server like a user's delete: the controller's
finalizer then removes a checkpoint's archives unless its storage retains them.
"""

from __future__ import annotations

import datetime
import heapq
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from checkpointer.adapters.kube import CHECKPOINTS, MIGRATIONS, Kube
from checkpointer.durations import parse_duration
from checkpointer.models import CheckpointStatus, ObjectStatus
from checkpointer.status import Conflict, StatusWriter
from checkpointer.ttl import desired_expiration, seconds_until, ttl_of

log = logging.getLogger(__name__)
# A delete the API server refused is tried again after this long.
RETRY_SECONDS = 10.0


@dataclass(frozen=True)
class Expiring:
    """A finished object the clock will delete."""

    plural: str
    namespace: str
    name: str
    uid: str

    @classmethod
    def of(cls, plural: str, body: dict[str, Any]) -> Expiring:
        meta = body["metadata"]
        return cls(plural, str(meta["namespace"]), str(meta["name"]), str(meta["uid"]))

    @property
    def kind(self) -> str:
        return {CHECKPOINTS: "ContainerCheckpoint", MIGRATIONS: "ContainerMigration"}.get(
            self.plural, "ContainerRestore"
        )


# Called with the deleted object and a message, to post the Event `Expired`.
Announce = Callable[[Expiring, str], None]


class ExpiryClock:
    def __init__(self, kube: Kube, default_ttl: str, announce: Announce) -> None:
        if default_ttl:
            parse_duration(default_ttl)  # a bad CHECKPOINTER_DEFAULT_TTL stops the controller at start
        self.kube = kube
        self.default_ttl = default_ttl
        self.announce = announce
        self._heap: list[tuple[float, str]] = []
        self._due: dict[str, tuple[float, Expiring]] = {}
        self._changed = threading.Condition()

    def __len__(self) -> int:
        return len(self._due)

    def observe(self, plural: str, body: dict[str, Any]) -> None:
        """An object as the watch saw it: its expiration written if missing, and the clock set for it."""
        meta = body["metadata"]
        if meta.get("deletionTimestamp"):
            self.forget(str(meta["uid"]))
            return
        expires = desired_expiration(body, self.default_ttl)
        if expires is None:
            self.forget(str(meta["uid"]))
            return
        if ObjectStatus.of(body).expiration != expires:
            # Written by the controller for a default ttl (the agent knows only spec.ttl), or after spec.ttl changed.
            try:
                writer = StatusWriter(self.kube, plural, body)
                writer.write(writer.model.model_validate({"expiration": expires}))
            except Conflict:
                return
        self.schedule(Expiring.of(plural, body), expires)

    def schedule(self, obj: Expiring, expires: str) -> None:
        when = time.time() + seconds_until(expires, datetime.datetime.now(datetime.UTC))
        with self._changed:
            known = self._due.get(obj.uid)
            if known is not None and known[0] == when:
                return
            self._due[obj.uid] = (when, obj)
            heapq.heappush(self._heap, (when, obj.uid))
            self._changed.notify()

    def forget(self, uid: str) -> None:
        with self._changed:
            self._due.pop(uid, None)  # its heap entry is skipped when it comes up

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            for obj in self._next_due(stop):
                try:
                    self.expire(obj)
                except Exception as e:  # the API server may be away: the object waits for the next try
                    log.warning("could not delete expired %s %s/%s yet: %s", obj.kind, obj.namespace, obj.name, e)
                    self._retry(obj)

    def wake(self) -> None:
        with self._changed:
            self._changed.notify()

    def _next_due(self, stop: threading.Event) -> list[Expiring]:
        """Wait until the earliest expiration has come; returns every object due by then."""
        with self._changed:
            while not stop.is_set():
                now = time.time()
                due: list[Expiring] = []
                while self._heap and self._heap[0][0] <= now:
                    when, uid = heapq.heappop(self._heap)
                    known = self._due.get(uid)
                    if known is not None and known[0] == when:
                        due.append(self._due.pop(uid)[1])
                if due:
                    return due
                self._changed.wait(min(60.0, self._heap[0][0] - now) if self._heap else 60.0)
        return []

    def _retry(self, obj: Expiring) -> None:
        when = time.time() + RETRY_SECONDS
        with self._changed:
            self._due[obj.uid] = (when, obj)
            heapq.heappush(self._heap, (when, obj.uid))

    def expire(self, obj: Expiring) -> None:
        fresh = self.kube.get(obj.plural, obj.namespace, obj.name)
        if fresh is None or fresh["metadata"].get("uid") != obj.uid or fresh["metadata"].get("deletionTimestamp"):
            return
        expires = desired_expiration(fresh, self.default_ttl)
        if expires is None:
            return
        if seconds_until(expires, datetime.datetime.now(datetime.UTC)) > 0:  # its ttl was made longer
            self.schedule(obj, expires)
            return
        if not self.kube.delete(obj.plural, obj.namespace, obj.name, obj.uid):
            return
        status = CheckpointStatus.of(fresh) if obj.plural == CHECKPOINTS else ObjectStatus.of(fresh)
        message = (
            f"{status.phase} at {status.completion_time}, ttl {ttl_of(fresh, self.default_ttl)}: "
            f"expired at {expires} and deleted"
        )
        if isinstance(status, CheckpointStatus) and status.storage_ref and status.archives:
            storage = status.storage_ref.name
            message += f", with its archives unless CheckpointStorage {storage} retains them"
        log.info("%s %s/%s: %s", obj.kind, obj.namespace, obj.name, message)
        try:
            self.announce(obj, message)
        except Exception as e:  # deleted all the same: never deleted twice for a lost Event
            log.warning("could not post the Event Expired of %s/%s: %s", obj.namespace, obj.name, e)
