"""CheckpointSchedule decisions, pure: when a schedule fires, what it catches up, what it keeps.

They behave as a Kubernetes CronJob does (docs/api.md): after downtime at most one missed run is
caught up, and only within startingDeadlineSeconds; a suspended schedule starts nothing; Forbid
skips a run while one of its checkpoints is still active. The clock and the API calls that act on
these decisions are in checkpointer/schedules.py.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from checkpointer import GROUP, VERSION
from checkpointer.conditions import format_time, parse_time
from checkpointer.durations import parse_duration
from checkpointer.models import CheckpointSchedule, ConcurrencyPolicy
from checkpointer.reasons import FINISHED, Phase

SCHEDULE_LABEL = f"{GROUP}/schedule"
SCHEDULED_TIME_ANNOTATION = f"{GROUP}/scheduled-time"
TRIGGER_ANNOTATION = f"{GROUP}/trigger"
# A run's checkpoint is created this long before its time (at most half the time since the run
# before it), and its node's agent starts it at the scheduled second. A thousand schedules due in the
# same second then spread their creations over the half minute before it, instead of queueing
# behind each other after it (docs/usage.md, "Schedules and retention").
CREATE_AHEAD_SECONDS = 30.0
# An agent waits for a checkpoint's scheduled time at most this long: anyone who may create a
# ContainerCheckpoint may also write the annotation.
START_WAIT_LIMIT_SECONDS = 2 * CREATE_AHEAD_SECONDS
NOT_STARTED = ("", Phase.PENDING, Phase.SCHEDULED)
# A label value holds at most 63 characters, and every checkpoint carries its schedule's name in one.
MAX_NAME_LENGTH = 63


class InvalidSchedule(ValueError):
    """The cron text or the time zone cannot be used; the message says why, for a person."""


@dataclass(frozen=True)
class Clock:
    """A schedule's cron expression in its time zone."""

    expression: str
    zone: ZoneInfo

    @classmethod
    def of(cls, expression: str, zone: str | None) -> Clock:
        """Five fields (minute first), six (seconds first: an extension for tests and short
        intervals), or a macro such as @daily. Raises InvalidSchedule."""
        fields = expression.split()
        if not expression.startswith("@") and len(fields) not in (5, 6):
            raise InvalidSchedule(f"schedule {expression!r} has {len(fields)} fields; it needs 5 (or 6, seconds first)")
        try:
            tz = ZoneInfo(zone or "UTC")
        except (ZoneInfoNotFoundError, ValueError):
            raise InvalidSchedule(f"timeZone {zone!r} is not an IANA time zone name such as Europe/Berlin") from None
        clock = cls(" ".join(fields), tz)
        try:
            clock.next_after(datetime.datetime.now(datetime.UTC))
        except (ValueError, KeyError, TypeError) as e:  # croniter's own errors derive from ValueError
            raise InvalidSchedule(f"schedule {expression!r} is not a cron expression: {e}") from None
        return clock

    def _iterator(self, start: datetime.datetime) -> croniter:
        return croniter(
            self.expression,
            start.astimezone(self.zone),
            second_at_beginning=len(self.expression.split()) == 6,
        )

    def next_after(self, moment: datetime.datetime) -> datetime.datetime:
        """The first run strictly after `moment`, in UTC."""
        found: datetime.datetime = self._iterator(moment).get_next(datetime.datetime)
        return found.astimezone(datetime.UTC)

    def last_at_or_before(self, moment: datetime.datetime) -> datetime.datetime:
        """The latest run at or before `moment`, in UTC."""
        found: datetime.datetime = self._iterator(moment + datetime.timedelta(microseconds=1)).get_prev(
            datetime.datetime
        )
        return found.astimezone(datetime.UTC)


def creation_time(clock: Clock, run: datetime.datetime) -> datetime.datetime:
    """When the checkpoint of `run` is created: CREATE_AHEAD_SECONDS before it, or half the time
    since the run before it when that is shorter, so that one run's checkpoint is made after the
    previous run's time (Forbid judges a run by the one before it)."""
    previous = clock.last_at_or_before(run - datetime.timedelta(microseconds=1))
    ahead = min(CREATE_AHEAD_SECONDS, (run - previous).total_seconds() / 2)
    return run - datetime.timedelta(seconds=ahead)


def start_delay(annotations: Mapping[str, str], now: datetime.datetime) -> float:
    """Seconds an agent waits before it starts a checkpoint: until its scheduled time, when that is
    ahead, but never more than START_WAIT_LIMIT_SECONDS. 0 for a checkpoint without one."""
    scheduled = parse_time(str(annotations.get(SCHEDULED_TIME_ANNOTATION) or ""))
    if scheduled is None:
        return 0.0
    return max(0.0, min(START_WAIT_LIMIT_SECONDS, (scheduled - now).total_seconds()))


@dataclass(frozen=True)
class CatchUp:
    """What a schedule owes for the time nobody watched it (controller down, schedule suspended)."""

    run: datetime.datetime | None  # the one missed run to start now
    missed: datetime.datetime | None  # the latest missed run, past its deadline: not started


def catch_up(
    clock: Clock,
    last_scheduled: datetime.datetime,
    now: datetime.datetime,
    starting_deadline_seconds: int | None,
) -> CatchUp:
    """At most one missed run, the latest, and only within the starting deadline (a CronJob's rule).

    `last_scheduled` is the schedule's lastScheduleTime, or its creation when it never ran.
    """
    latest = clock.last_at_or_before(now)
    if latest <= last_scheduled:
        return CatchUp(None, None)
    if starting_deadline_seconds is not None and (now - latest).total_seconds() > starting_deadline_seconds:
        return CatchUp(None, latest)
    return CatchUp(latest, None)


def too_late(run: datetime.datetime, now: datetime.datetime, starting_deadline_seconds: int | None) -> bool:
    """A run whose start is past its deadline is missed, not started late."""
    return starting_deadline_seconds is not None and (now - run).total_seconds() > starting_deadline_seconds


@dataclass(frozen=True)
class Child:
    """One checkpoint a schedule made, as the controller last saw it."""

    name: str
    uid: str
    scheduled: datetime.datetime
    phase: str = ""
    completion: datetime.datetime | None = None
    deleting: bool = False
    owner: str = ""  # the uid of the schedule that made it

    @property
    def finished(self) -> bool:
        return self.phase in FINISHED


def blocks(policy: ConcurrencyPolicy, children: Iterable[Child]) -> Child | None:
    """The active checkpoint that makes Forbid skip a run; None when the run may start."""
    if policy != ConcurrencyPolicy.FORBID:
        return None
    active = sorted((c for c in children if not c.finished and not c.deleting), key=lambda c: c.scheduled)
    return active[0] if active else None


def waiting(children: Iterable[Child], now: datetime.datetime) -> list[Child]:
    """Checkpoints created ahead of their time that have not started: what suspending withdraws."""
    return [c for c in children if c.phase in NOT_STARTED and c.scheduled > now and not c.deleting]


def expired(
    children: Sequence[Child], keep_last: int | None, max_age: datetime.timedelta | None, now: datetime.datetime
) -> list[Child]:
    """The finished checkpoints retention deletes, oldest first: those beyond the newest `keep_last`
    finished ones, and those scheduled longer than `max_age` ago.

    The newest Succeeded one always stays, so failures never push out the last good checkpoint; nor
    does an old one vanish while no newer run has succeeded to take its place.
    """
    finished = sorted((c for c in children if c.finished and not c.deleting), key=lambda c: c.scheduled, reverse=True)
    last_good = next((c for c in finished if c.phase == Phase.SUCCEEDED), None)
    doomed = []
    for index, child in enumerate(finished):
        if child is last_good:
            continue
        beyond_count = keep_last is not None and index >= keep_last
        too_old = max_age is not None and now - child.scheduled > max_age
        if beyond_count or too_old:
            doomed.append(child)
    return sorted(doomed, key=lambda c: c.scheduled)


def unix(moment: datetime.datetime) -> int:
    return int(moment.timestamp())


def child_name(schedule: str, run: datetime.datetime, cordon: bool = False) -> str:
    """Deterministic: a controller that starts again can never make the same run twice."""
    return f"{schedule}-cordon-{unix(run)}" if cordon else f"{schedule}-{unix(run)}"


def child(schedule: CheckpointSchedule, run: datetime.datetime, cordon: bool = False) -> dict[str, Any]:
    """The ContainerCheckpoint a run creates: the template, owned by and labelled with the schedule."""
    meta = schedule.metadata
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ContainerCheckpoint",
        "metadata": {
            "name": child_name(meta.name, run, cordon),
            "namespace": meta.namespace,
            "labels": {SCHEDULE_LABEL: meta.name},
            "annotations": {
                SCHEDULED_TIME_ANNOTATION: format_time(run, precise=True),
                TRIGGER_ANNOTATION: "cordon" if cordon else "schedule",
            },
            "ownerReferences": [
                {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "CheckpointSchedule",
                    "name": meta.name,
                    "uid": meta.uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": dict(schedule.spec.template),
    }


def cordon_migrations(schedule: CheckpointSchedule, run: datetime.datetime) -> list[dict[str, Any]]:
    """The ContainerMigrations a cordon makes with cordonAction Migrate: one per container the template
    names, from the template's node to one the controller chooses, owned by and labelled with the
    schedule, named `<schedule>-cordon-<unix time>-<index>`. Pure.

    The template's export.storageRef, compress and tcpEstablished go with them; each is judged as a
    ContainerMigration (and its checkpoint as a ContainerCheckpoint) of the schedule's namespace.
    """
    base = child(schedule, run, cordon=True)
    template = schedule.spec.template
    spec: dict[str, Any] = {}
    storage = (template.get("export") or {}).get("storageRef")
    if storage:
        spec["storageRef"] = dict(storage)
    if template.get("compress"):
        spec["compress"] = template["compress"]
    if template.get("tcpEstablished"):
        spec["tcpEstablished"] = True
    made = []
    for index, container in enumerate(template.get("containers") or []):
        metadata = {**base["metadata"], "name": f"{base['metadata']['name']}-{index}"}
        # No scheduled time: a migration starts when it is made, the moment of the cordon.
        metadata["annotations"] = {TRIGGER_ANNOTATION: "cordon"}
        source = {"nodeName": schedule.spec.node_name, "container": str(container)}
        made.append({**base, "kind": "ContainerMigration", "metadata": metadata, "spec": {"source": source, **spec}})
    return made


def max_age(schedule: CheckpointSchedule) -> datetime.timedelta | None:
    retention = schedule.spec.retention
    if retention is None or not retention.max_age:
        return None
    return parse_duration(retention.max_age)


def keep_last(schedule: CheckpointSchedule) -> int | None:
    retention = schedule.spec.retention
    return None if retention is None else retention.keep_last
