"""CheckpointSchedules: one clock for all of them, fed by watch events.

No kopf timer per schedule (a thousand of them ticking would cost more than the work): the watch
events of schedules, of the checkpoints they made and of Nodes keep an in-memory picture, and
one clock thread sleeps until the earliest next creation, then hands the runs that are due to a
small pool of threads that create the checkpoints. Each run's checkpoint is created ahead of its
time (services/schedule_rules.py creation_time) and the agent starts it at the scheduled second. Status
is written from that picture by a second pool, only when it changed. Decisions are in
services/schedule_rules.py.
"""

from __future__ import annotations

import dataclasses
import datetime
import heapq
import itertools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import kopf
from kubernetes.client import ApiException
from pydantic import ValidationError

from checkpointer import GROUP, VERSION
from checkpointer.adapters.kube import CHECKPOINTS, MIGRATIONS, SCHEDULES, Kube
from checkpointer.conditions import format_time, parse_time, set_condition
from checkpointer.models import (
    CheckpointSchedule,
    Condition,
    CordonAction,
    ObjectReference,
    ObjectStatus,
    ScheduleStatus,
)
from checkpointer.reasons import ConditionType, Reason
from checkpointer.services import schedule_rules as decide
from checkpointer.services.schedule_rules import Child, Clock, InvalidSchedule
from checkpointer.settings import Settings
from checkpointer.status import Conflict, EventType, StatusWriter, post_event

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, name)
# Runs are created by this many threads at once (a thousand schedules may fire in the same second:
# the API's latency, not the CPU, bounds them); status is written by a few more.
RUN_THREADS = 16
STATUS_THREADS = 4


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass
class Entry:
    """What the controller knows of one schedule."""

    schedule: CheckpointSchedule
    # Its status as last written or read: a write sends only what changed since.
    writer: StatusWriter
    clock: Clock | None = None
    invalid: str = ""
    version: int = 0  # bumped on every change of spec: older clock entries are stale
    last_scheduled: datetime.datetime | None = None
    last_successful: datetime.datetime | None = None
    last_cordon: datetime.datetime | None = None
    conditions: list[Condition] = field(default_factory=list)
    children: dict[str, Child] = field(default_factory=dict)

    @property
    def key(self) -> Key:
        return self.schedule.metadata.namespace, self.schedule.metadata.name

    @property
    def idle(self) -> bool:
        """No runs are due from the clock: suspended, or a schedule that cannot be read."""
        return self.clock is None or self.schedule.spec.suspend


class Schedules:
    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self.lock = threading.Condition()
        self.entries: dict[Key, Entry] = {}
        # Children seen before their schedule (the watches list in any order after a start).
        self.orphans: dict[Key, dict[str, Child]] = {}
        self.cordoned: dict[str, bool] = {}
        # (when to act, tie-breaker, schedule, its version, the run's time, whether this is the
        # run-time look of a Forbid decision put off from creation time)
        self.heap: list[tuple[float, int, Key, int, float, bool]] = []
        self.sequence = itertools.count()
        self.dirty: set[Key] = set()
        self.runs = ThreadPoolExecutor(RUN_THREADS, thread_name_prefix="schedule-run")
        self.writes = ThreadPoolExecutor(STATUS_THREADS, thread_name_prefix="schedule-status")
        self.stopped = False
        self.thread = threading.Thread(target=self._tick, name="schedule-clock", daemon=True)

    # --- watch events (called in kopf's event loop: short, no I/O) ----------------------------

    def observe(self, body: kopf.Body) -> None:
        try:
            schedule = CheckpointSchedule.model_validate(dict(body))
        except ValidationError as e:  # the CRD admits only valid ones; an old object may not be
            log.warning("CheckpointSchedule %s cannot be read: %s", _where(body), e)
            return
        with self.lock:
            key = (schedule.metadata.namespace, schedule.metadata.name)
            entry = self.entries.get(key)
            if entry is not None and entry.schedule.metadata.uid == schedule.metadata.uid:
                same = entry.schedule.spec == schedule.spec
                entry.schedule = schedule
                if same:
                    return
                was_idle = entry.idle
            else:
                entry = self._adopt(key, schedule)
                was_idle = True
            entry.version = next(self.sequence)  # unique: a recreated schedule's entries stay stale
            self._read_clock(entry)
            self._mark(key)
            if entry.schedule.spec.suspend:
                self._withdraw(entry)
            if entry.idle:
                return
            if was_idle:  # started, resumed or repaired: what did it miss meanwhile?
                self.runs.submit(self._catch_up, key, entry.version)
            self._push(entry, _now())
            self._check_cordon(entry)

    def _adopt(self, key: Key, schedule: CheckpointSchedule) -> Entry:
        status = schedule.status
        # Checkpoints of an earlier schedule of the same name are not this one's: the garbage collector's.
        seen = self.orphans.pop(key, {})
        writer = StatusWriter(self.kube, SCHEDULES, schedule.model_dump(by_alias=True))
        entry = Entry(schedule, writer, children={n: c for n, c in seen.items() if c.owner == schedule.metadata.uid})
        entry.last_scheduled = _time(status.last_schedule_time)
        entry.last_successful = _time(status.last_successful_time)
        entry.last_cordon = _time(status.last_cordon_time)
        entry.conditions = list(status.conditions)
        self.entries[key] = entry
        return entry

    def _read_clock(self, entry: Entry) -> None:
        spec = entry.schedule.spec
        try:
            entry.clock, entry.invalid = Clock.of(spec.schedule, spec.time_zone), ""
        except InvalidSchedule as e:
            entry.clock, entry.invalid = None, str(e)
            self._event(entry, "Warning", Reason.INVALID_SCHEDULE, str(e))

    def forget(self, namespace: str, name: str) -> None:
        with self.lock:
            self.entries.pop((namespace, name), None)
            self.orphans.pop((namespace, name), None)

    def child_seen(self, body: kopf.Body, gone: bool) -> None:
        labels = body.get("metadata", {}).get("labels") or {}
        key = (str(body["metadata"]["namespace"]), str(labels.get(decide.SCHEDULE_LABEL)))
        name = str(body["metadata"]["name"])
        with self.lock:
            entry = self.entries.get(key)
            children = entry.children if entry is not None else self.orphans.setdefault(key, {})
            child = _child(body)
            if gone or (entry is not None and child.owner != entry.schedule.metadata.uid):
                children.pop(name, None)
            else:
                children[name] = child
            if entry is not None:
                self._mark(key)

    def node_seen(self, name: str, unschedulable: bool) -> None:
        with self.lock:
            self.cordoned[name] = unschedulable
            for entry in self.entries.values():
                if entry.schedule.spec.on_node_cordon and entry.schedule.spec.node_name == name:
                    self._check_cordon(entry)

    # --- the clock ----------------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
            self.lock.notify()
        self.runs.shutdown(wait=False, cancel_futures=True)
        self.writes.shutdown(wait=False, cancel_futures=True)

    def _push(self, entry: Entry, after: datetime.datetime) -> None:
        """Under the lock: the next run after `after`, to be created ahead of its time."""
        assert entry.clock is not None
        run = entry.clock.next_after(after)
        at = decide.creation_time(entry.clock, run).timestamp()
        heapq.heappush(self.heap, (at, next(self.sequence), entry.key, entry.version, run.timestamp(), False))
        self.lock.notify()

    def _look_again_at_run_time(self, key: Key, run: datetime.datetime) -> None:
        with self.lock:
            entry = self.entries.get(key)
            if entry is not None:
                at = run.timestamp()
                heapq.heappush(self.heap, (at, next(self.sequence), key, entry.version, at, True))
                self.lock.notify()

    def _tick(self) -> None:
        with self.lock:
            while not self.stopped:
                if not self.heap:
                    self.lock.wait()
                    continue
                at, _, key, version, run_at, again = self.heap[0]
                delay = at - time.time()
                if delay > 0:
                    self.lock.wait(delay)
                    continue
                heapq.heappop(self.heap)
                entry = self.entries.get(key)
                if entry is None or entry.version != version or entry.idle:
                    continue  # deleted, changed (a newer entry is queued) or suspended
                run = datetime.datetime.fromtimestamp(run_at, datetime.UTC)
                if not again:
                    self._push(entry, run)
                self.runs.submit(self._run, key, run)

    # --- runs (in the run pool) -----------------------------------------------------------------

    def _catch_up(self, key: Key, version: int) -> None:
        with self.lock:
            entry = self.entries.get(key)
            if entry is None or entry.version != version or entry.clock is None:
                return
            since = entry.last_scheduled or _time(entry.schedule.metadata.creation_timestamp) or _now()
            owed = decide.catch_up(entry.clock, since, _now(), entry.schedule.spec.starting_deadline_seconds)
        if owed.missed is not None:
            self._event(
                entry,
                "Warning",
                Reason.MISSED,
                f"missed the run of {format_time(owed.missed, precise=False)}: it is more than "
                f"startingDeadlineSeconds ({entry.schedule.spec.starting_deadline_seconds}) late",
            )
        if owed.run is not None:
            log.info("CheckpointSchedule %s/%s catches up its run of %s", *key, owed.run)
            self._run(key, owed.run, catch_up=True)

    def _run(self, key: Key, run: datetime.datetime, cordon: bool = False, catch_up: bool = False) -> None:
        """Create the checkpoint of one run, unless the schedule's rules say otherwise."""
        if catch_up:  # after a start the watch may not have listed every child yet: ask
            self._refresh_children(key)
        with self.lock:
            entry = self.entries.get(key)
            if entry is None or entry.schedule.spec.suspend:
                return
            spec = entry.schedule.spec
            late = not cordon and decide.too_late(run, _now(), spec.starting_deadline_seconds)
            blocker = decide.blocks(spec.concurrency_policy, entry.children.values())
            body = decide.child(entry.schedule, run, cordon)
        when = format_time(run, precise=False)
        what = f"the cordon of node {spec.node_name}" if cordon else f"the run of {when}"
        if catch_up:
            what = f"the missed run of {when} (caught up)"
        if late:
            message = f"missed {what}: it could not start within startingDeadlineSeconds"
            self._event(entry, "Warning", Reason.MISSED, message)
            return
        if blocker is not None and _now() < run:
            # Ahead of the run's time: the active checkpoint may yet finish. Forbid judges at the run's time.
            self._look_again_at_run_time(key, run)
            return
        if blocker is not None:
            message = f"skipped {what}: {blocker.name} is still active (concurrencyPolicy Forbid)"
            self._event(entry, "Normal", Reason.SKIPPED, message)
            return
        if cordon and spec.cordon_action == CordonAction.MIGRATE:
            self._migrate(entry, run, what)
            return
        name = str(body["metadata"]["name"])
        try:
            created = self.kube.create(CHECKPOINTS, key[0], body)
        except ApiException as e:
            self._event(entry, "Warning", Reason.FAILED_CREATE, f"could not create {name}: {e.status} {e.reason}")
            return
        except Exception as e:  # the connection itself: urllib3's errors are no ApiException
            self._event(entry, "Warning", Reason.FAILED_CREATE, f"could not create {name}: {e}")
            return
        with self.lock:
            if created is not None:
                entry.children.setdefault(name, _child(created))
            if not cordon:
                entry.last_scheduled = max(run, entry.last_scheduled or run)
            self._mark(key)
        if created is not None:
            self._event(entry, "Normal", Reason.CREATED, f"created ContainerCheckpoint {name} for {what}")
        else:  # made before a restart: names are deterministic
            log.info("CheckpointSchedule %s/%s: %s exists already", *key, name)

    def _migrate(self, entry: Entry, run: datetime.datetime, what: str) -> None:
        """cordonAction Migrate: the cordon moves the template's containers, one ContainerMigration each."""
        for body in decide.cordon_migrations(entry.schedule, run):
            name = str(body["metadata"]["name"])
            try:
                created = self.kube.create(MIGRATIONS, entry.key[0], body)
            except ApiException as e:
                self._event(entry, "Warning", Reason.FAILED_CREATE, f"could not create {name}: {e.status} {e.reason}")
                continue
            except Exception as e:  # the connection itself: urllib3's errors are no ApiException
                self._event(entry, "Warning", Reason.FAILED_CREATE, f"could not create {name}: {e}")
                continue
            if created is not None:
                self._event(entry, "Normal", Reason.CREATED, f"created ContainerMigration {name} for {what}")

    def _refresh_children(self, key: Key) -> None:
        try:
            found = self.kube.labelled(CHECKPOINTS, key[0], f"{decide.SCHEDULE_LABEL}={key[1]}")
        except ApiException as e:
            log.warning("could not list the checkpoints of CheckpointSchedule %s/%s: %s", *key, e)
            return
        with self.lock:
            entry = self.entries.get(key)
            if entry is not None:
                entry.children = {str(o["metadata"]["name"]): _child(o) for o in found}

    def _withdraw(self, entry: Entry) -> None:
        """Under the lock: a suspended schedule starts nothing, not even what it created ahead of time."""
        for child in decide.waiting(entry.children.values(), _now()):
            entry.children[child.name] = dataclasses.replace(child, deleting=True)
            self.writes.submit(self._delete, entry, child, "withdrawn: the schedule is suspended")

    def _check_cordon(self, entry: Entry) -> None:
        """Under the lock: a cordon of the template's node takes one checkpoint, once per cordon."""
        spec = entry.schedule.spec
        cordoned = self.cordoned.get(spec.node_name)
        if not spec.on_node_cordon or cordoned is None or entry.invalid:
            return
        if not cordoned and entry.last_cordon is not None:
            entry.last_cordon = None  # uncordoned: the next cordon takes another
            self._mark(entry.key)
        elif cordoned and entry.last_cordon is None and not spec.suspend:
            at = _now().replace(microsecond=0)
            # Names have whole seconds: a cordon in the same second as the last one takes the next.
            while decide.child_name(entry.schedule.metadata.name, at, cordon=True) in entry.children:
                at += datetime.timedelta(seconds=1)
            entry.last_cordon = at
            self._mark(entry.key)
            self.runs.submit(self._run, entry.key, entry.last_cordon, True)

    # --- status and retention (in the status pool) ----------------------------------------------

    def _mark(self, key: Key) -> None:
        """Under the lock: the schedule's status or retention needs a look."""
        if key not in self.dirty and not self.stopped:
            self.dirty.add(key)
            self.writes.submit(self._sync, key)

    def _sync(self, key: Key) -> None:
        with self.lock:
            self.dirty.discard(key)
            entry = self.entries.get(key)
            if entry is None:
                return
            changed = self._status(entry).changed_since(entry.writer.status)
            schedule = entry.schedule
            doomed = decide.expired(
                list(entry.children.values()), decide.keep_last(schedule), decide.max_age(schedule), _now()
            )
            for child in doomed:
                entry.children[child.name] = dataclasses.replace(child, deleting=True)
        for child in doomed:
            self._delete(entry, child)
        if not changed.model_fields_set:
            return
        try:
            entry.writer.write(changed, patient=False)
        except Conflict:  # gone
            return
        except Exception as e:  # ApiException, or the connection itself
            log.warning("status of CheckpointSchedule %s/%s not written yet: %s", *key, e)
            time.sleep(1)
            with self.lock:
                self._mark(key)

    def _status(self, entry: Entry) -> ScheduleStatus:
        """Under the lock: the status the schedule should show."""
        children = sorted(entry.children.values(), key=lambda c: c.scheduled)
        active = [c for c in children if not c.finished]
        succeeded = [c.completion for c in children if c.phase == "Succeeded" and c.completion]
        if entry.last_successful is not None:  # a deleted checkpoint's success still counts
            succeeded.append(entry.last_successful)
        entry.last_successful = max(succeeded, default=None)
        spec, meta = entry.schedule.spec, entry.schedule.metadata
        if entry.invalid:
            ready, reason, message = False, Reason.INVALID_SCHEDULE, entry.invalid
        elif spec.suspend:
            ready, reason, message = True, Reason.SUSPENDED, "suspended: no runs start until spec.suspend is false"
        else:
            zone = spec.time_zone or "UTC"
            ready, reason, message = True, Reason.ACTIVE, f"checkpoints on {spec.schedule!r} ({zone})"
        entry.conditions = set_condition(entry.conditions, ConditionType.READY, ready, reason, message, meta.generation)
        return ScheduleStatus(
            last_schedule_time=_format(entry.last_scheduled),
            last_successful_time=_format(entry.last_successful),
            last_cordon_time=_format(entry.last_cordon),
            active=[_reference(meta.namespace, c) for c in active],
            active_count=len(active),
            conditions=entry.conditions,
            observed_generation=meta.generation,
        )

    def _delete(self, entry: Entry, child: Child, why: str = "retention") -> None:
        try:
            deleted = self.kube.delete(CHECKPOINTS, entry.schedule.metadata.namespace, child.name, child.uid)
        except Exception as e:  # ApiException, or the connection itself
            log.warning("%s: could not delete %s yet: %s", why, child.name, e)
            with self.lock:
                entry.children[child.name] = child  # the next look tries again
            return
        if not deleted:
            log.info("%s: %s of CheckpointSchedule %s/%s was gone already", why, child.name, *entry.key)
        else:
            when = format_time(child.scheduled, precise=False)
            self._event(entry, "Normal", Reason.DELETED, f"deleted ContainerCheckpoint {child.name} of {when} ({why})")

    def _event(self, entry: Entry, type_: EventType, reason: Reason, message: str) -> None:
        log.info("CheckpointSchedule %s/%s: %s: %s", *entry.key, reason, message)
        post_event("CheckpointSchedule", entry.schedule.metadata, type_, reason, message)


def _where(body: kopf.Body) -> str:
    return f"{body['metadata'].get('namespace')}/{body['metadata'].get('name')}"


def _time(text: Any) -> datetime.datetime | None:
    return parse_time(str(text or ""))


def _format(moment: datetime.datetime | None) -> str | None:
    return None if moment is None else format_time(moment, precise=False)


def _child(body: kopf.Body | dict[str, Any]) -> Child:
    meta = body["metadata"]
    status = ObjectStatus.of(body)
    annotations = meta.get("annotations") or {}
    scheduled = _time(annotations.get(decide.SCHEDULED_TIME_ANNOTATION)) or _time(meta.get("creationTimestamp"))
    return Child(
        name=str(meta["name"]),
        uid=str(meta.get("uid") or ""),
        scheduled=scheduled or _now(),
        phase=status.phase or "",
        completion=_time(status.completion_time),
        deleting=bool(meta.get("deletionTimestamp")),
        owner=next((str(o.get("uid")) for o in meta.get("ownerReferences") or [] if o.get("controller")), ""),
    )


def _reference(namespace: str, child: Child) -> ObjectReference:
    return ObjectReference(
        api_version=f"{GROUP}/{VERSION}",
        kind="ContainerCheckpoint",
        namespace=namespace,
        name=child.name,
        uid=child.uid,
    )


def register(registry: kopf.OperatorRegistry, settings: Settings, kube: Kube) -> None:
    del settings, kube  # nothing to tune yet; the signature matches the other registrations
    # A connection pool of its own: a burst of runs neither waits for the handlers' connections nor
    # opens (and drops) connections beyond their pool.
    schedules = Schedules(Kube(connections=RUN_THREADS + STATUS_THREADS))
    labelled = {decide.SCHEDULE_LABEL: kopf.PRESENT}

    @kopf.on.startup(registry=registry)
    def start_schedule_clock(**_: Any) -> None:
        schedules.start()

    @kopf.on.cleanup(registry=registry)
    def stop_schedule_clock(**_: Any) -> None:
        schedules.stop()

    # Async on purpose: these only update the in-memory picture, without a thread hop per event.
    @kopf.on.event(GROUP, VERSION, SCHEDULES, registry=registry)
    async def schedule_changed(body: kopf.Body, type: str | None, **_: Any) -> None:
        if type == "DELETED":
            schedules.forget(str(body["metadata"]["namespace"]), str(body["metadata"]["name"]))
        else:
            schedules.observe(body)

    @kopf.on.event(GROUP, VERSION, CHECKPOINTS, labels=labelled, registry=registry)
    async def scheduled_checkpoint_changed(body: kopf.Body, type: str | None, **_: Any) -> None:
        schedules.child_seen(body, gone=type == "DELETED")

    @kopf.on.event("", "v1", "nodes", registry=registry)
    async def node_changed(body: kopf.Body, type: str | None, **_: Any) -> None:
        if type != "DELETED":
            schedules.node_seen(str(body["metadata"]["name"]), bool((body.get("spec") or {}).get("unschedulable")))
