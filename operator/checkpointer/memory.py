"""What kopf remembers of each object's handlers, in the memory of the process: both roles use it.

kopf keeps, for every object, the state it last handled (its diffbase) and each handler's progress
(success, retries, the time of the next try). Its default keeps them in annotations of the object,
but the annotations of a ContainerCheckpoint or a ContainerRestore are written by the tenant who owns
it: one who wrote kopf's annotations at creation (a handler's progress marked done, a last-handled
configuration equal to the object) would make the controller never schedule it. Kept here, nothing
a tenant writes reaches them, and they cost no write to the API server.

Not kopf's status storages, though tenants cannot write status either: every status write of the
controller and the agent carries the resourceVersion it read (status.py), and kopf's own writes of
its progress into status would move the object on under them, one more write per object and
handler. What a restart forgets costs nothing: every handler judges the object by its status, which
the API server keeps, so a restarted process runs each handler once more and that repeats nothing
(a scheduled object is not scheduled again, a checkpoint resumes where its status and work folder
say it is).

The memory is bounded (it forgets the objects it saw longest ago), but never forgets an object a
handler is working on (`InFlight`; the agent's handlers mark theirs): a tenant who creates many
objects for a node cannot make kopf take a checkpoint in flight for a new one and run it again from
the start of a retry it was waiting for. The controller's handlers judge every object by its status
alone, so one it forgot is at worst looked at once more.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import kopf

# Objects remembered at most, besides those in flight: a few KiB each.
LIMIT = 10_000


class InFlight:
    """The uids of the objects whose handler has begun and not ended: running, or awaiting kopf's retry."""

    def __init__(self) -> None:
        self._uids: set[str] = set()
        self._running: set[str] = set()
        self._lock = threading.Lock()

    def __contains__(self, uid: object) -> bool:
        with self._lock:
            return uid in self._uids

    def begin(self, uid: str) -> bool:
        """Mark a handler's run of `uid` begun; False (and nothing marked) when one is running already."""
        with self._lock:
            if uid in self._running:
                return False
            self._uids.add(uid)
            self._running.add(uid)
            return True

    def paused(self, uid: str) -> None:
        """The run stopped for kopf to try again later: it stays in flight."""
        with self._lock:
            self._running.discard(uid)

    def end(self, uid: str) -> None:
        """The handler is done with `uid`: it succeeded, failed for good, or the object left this process."""
        with self._lock:
            self._running.discard(uid)
            self._uids.discard(uid)

    def running(self, uid: str) -> bool:
        """Whether a handler is at work on `uid` right now (not merely awaiting a retry)."""
        with self._lock:
            return uid in self._running

    def __len__(self) -> int:
        with self._lock:
            return len(self._uids)


@dataclass
class _Object:
    essence: kopf.BodyEssence | None = None
    progress: dict[str, kopf.ProgressRecord] = field(default_factory=dict)
    declined: bool = False  # its handler found it was not this process's to act on


class Memory:
    """kopf's diffbase and handler progress for every object, by uid; at most `limit` besides those in flight."""

    def __init__(self, limit: int = LIMIT, in_flight: InFlight | None = None) -> None:
        self.limit = limit
        self.in_flight = in_flight or InFlight()
        self._objects: OrderedDict[str, _Object] = OrderedDict()
        self._lock = threading.Lock()

    def _of(self, uid: str) -> _Object:
        """The object's entry, made the newest; the oldest ones not in flight beyond the limit are forgotten."""
        with self._lock:
            entry = self._objects.get(uid)
            if entry is None:
                entry = self._objects[uid] = _Object()
            self._objects.move_to_end(uid)
            self._evict()
            return entry

    def _evict(self) -> None:
        excess = len(self._objects) - self.limit
        if excess <= 0:
            return
        # Oldest first; an object in flight is skipped, however old: its progress is what keeps kopf
        # from taking it for a new one.
        forgettable = list(itertools.islice((uid for uid in self._objects if uid not in self.in_flight), excess))
        for uid in forgettable:
            del self._objects[uid]

    def _peek(self, uid: str) -> _Object | None:
        with self._lock:
            return self._objects.get(uid)

    def decline(self, uid: str) -> None:
        """A handler did not act on the object: not this process's (yet). Seen again after it left, it is new."""
        self._of(uid).declined = True

    def left(self, uid: str) -> None:
        """The object left this process's watch: deleted, or labelled for another node.

        No handler is working on it any more. What kopf knows of it is kept, so that an object labelled
        back is not handled again, unless its handler declined it: then, labelled back, it is new.
        """
        self.in_flight.end(uid)
        with self._lock:
            entry = self._objects.get(uid)
            if entry is not None and entry.declined:
                del self._objects[uid]

    def __contains__(self, uid: object) -> bool:
        with self._lock:
            return uid in self._objects

    def __len__(self) -> int:
        with self._lock:
            return len(self._objects)

    def diffbase_storage(self, ignored_fields: list[str]) -> RememberedDiffBase:
        return RememberedDiffBase(self, ignored_fields=ignored_fields)

    def progress_storage(self, prefix: str) -> RememberedProgress:
        return RememberedProgress(self, prefix=prefix)


def _uid(body: kopf.Body) -> str:
    return str(body.metadata.uid)


class RememberedDiffBase(kopf.DiffBaseStorage):
    """The last handled state of each object."""

    def __init__(self, memory: Memory, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.memory = memory

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        entry = self.memory._peek(_uid(body))
        return None if entry is None else entry.essence

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        self.memory._of(_uid(body)).essence = essence


class RememberedProgress(kopf.AnnotationsProgressStorage):
    """Handler retries and delays. Only kopf's wake-up after a delay still writes (its touch annotation):
    the prefix is for that alone, and annotations a tenant wrote under it are never read."""

    def __init__(self, memory: Memory, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.memory = memory

    def fetch(self, *, key: str, body: kopf.Body) -> kopf.ProgressRecord | None:
        entry = self.memory._peek(_uid(body))
        return None if entry is None else entry.progress.get(key)

    def store(self, *, key: str, record: kopf.ProgressRecord, body: kopf.Body, patch: kopf.Patch) -> None:
        self.memory._of(_uid(body)).progress[key] = record

    def purge(self, *, key: str, body: kopf.Body, patch: kopf.Patch) -> None:
        entry = self.memory._peek(_uid(body))
        if entry is not None:
            entry.progress.pop(key, None)
