"""CheckpointSchedule decisions (services/schedule_rules.py): cron, catch-up, Forbid, retention, the child."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from checkpointer.models import CheckpointSchedule, ConcurrencyPolicy
from checkpointer.services import schedule_rules as schedules
from checkpointer.services.schedule_rules import Child, Clock, InvalidSchedule

UTC = datetime.UTC


def at(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text).replace(tzinfo=UTC)


def schedule(**spec: Any) -> CheckpointSchedule:
    return CheckpointSchedule.model_validate(
        {
            "metadata": {
                "name": "nightly",
                "namespace": "shop",
                "uid": "u-1",
                "creationTimestamp": "2026-01-01T00:00:00Z",
            },
            "spec": {"schedule": "0 2 * * *", "template": {"nodeName": "worker-1", "containers": ["db"]}, **spec},
        }
    )


def test_five_fields_are_minutes_first() -> None:
    clock = Clock.of("30 2 * * *", None)
    assert clock.next_after(at("2026-03-01T02:29:59")) == at("2026-03-01T02:30:00")
    assert clock.next_after(at("2026-03-01T02:30:00")) == at("2026-03-02T02:30:00")


def test_six_fields_are_seconds_first() -> None:
    clock = Clock.of("*/3 * * * * *", None)
    assert clock.next_after(at("2026-03-01T10:00:01.5")) == at("2026-03-01T10:00:03")
    assert clock.last_at_or_before(at("2026-03-01T10:00:05")) == at("2026-03-01T10:00:03")
    assert clock.last_at_or_before(at("2026-03-01T10:00:06")) == at("2026-03-01T10:00:06")


def test_time_zone_moves_the_runs() -> None:
    clock = Clock.of("0 2 * * *", "Europe/Berlin")  # CET is UTC+1 in winter
    assert clock.next_after(at("2026-01-10T00:00:00")) == at("2026-01-10T01:00:00")


def test_macros_are_accepted() -> None:
    assert Clock.of("@daily", None).next_after(at("2026-01-10T05:00:00")) == at("2026-01-11T00:00:00")


@pytest.mark.parametrize(
    ("text", "zone", "says"),
    [
        ("* * * *", None, "has 4 fields"),
        ("* * * * * * *", None, "has 7 fields"),
        ("61 * * * *", None, "is not a cron expression"),
        ("0 2 * * *", "Mars/Olympus", "not an IANA time zone"),
    ],
)
def test_bad_schedules_say_why(text: str, zone: str | None, says: str) -> None:
    with pytest.raises(InvalidSchedule, match=says):
        Clock.of(text, zone)


def test_catch_up_takes_only_the_latest_missed_run() -> None:
    clock = Clock.of("*/10 * * * *", None)
    owed = schedules.catch_up(clock, at("2026-03-01T10:00:00"), at("2026-03-01T10:45:00"), None)
    assert owed == schedules.CatchUp(at("2026-03-01T10:40:00"), None)


def test_catch_up_within_the_deadline_only() -> None:
    clock = Clock.of("*/10 * * * *", None)
    within = schedules.catch_up(clock, at("2026-03-01T10:00:00"), at("2026-03-01T10:41:00"), 120)
    assert within.run == at("2026-03-01T10:40:00")
    past = schedules.catch_up(clock, at("2026-03-01T10:00:00"), at("2026-03-01T10:45:00"), 120)
    assert past == schedules.CatchUp(None, at("2026-03-01T10:40:00"))


def test_nothing_to_catch_up_when_the_last_run_was_made() -> None:
    clock = Clock.of("*/10 * * * *", None)
    assert schedules.catch_up(clock, at("2026-03-01T10:40:00"), at("2026-03-01T10:45:00"), None).run is None


def test_too_late() -> None:
    run = at("2026-03-01T10:00:00")
    assert not schedules.too_late(run, run + datetime.timedelta(seconds=30), None)
    assert not schedules.too_late(run, run + datetime.timedelta(seconds=5), 10)
    assert schedules.too_late(run, run + datetime.timedelta(seconds=11), 10)


def child(name: str, minute: int, phase: str = "Succeeded", **kw: Any) -> Child:
    return Child(name, f"uid-{name}", at(f"2026-03-01T10:{minute:02d}:00"), phase, **kw)


def test_forbid_blocks_while_one_is_active_and_allow_never() -> None:
    children = [child("a", 0), child("b", 1, "Uploading")]
    assert schedules.blocks(ConcurrencyPolicy.FORBID, children) == children[1]
    assert schedules.blocks(ConcurrencyPolicy.ALLOW, children) is None
    assert schedules.blocks(ConcurrencyPolicy.FORBID, [child("a", 0), child("c", 2, "Failed")]) is None
    # A just-created checkpoint has no phase yet: it is active.
    assert schedules.blocks(ConcurrencyPolicy.FORBID, [child("d", 3, "")]) is not None


def names(children: list[Child]) -> list[str]:
    return [c.name for c in children]


def test_retention_keeps_the_newest_finished() -> None:
    children = [child(n, i) for i, n in enumerate("abcde")] + [child("f", 6, "Checkpointing")]
    assert names(schedules.expired(children, 2, None, at("2026-03-01T11:00:00"))) == ["a", "b", "c"]


def test_failures_never_push_out_the_last_good_one() -> None:
    children = [child("good", 0), child("bad1", 1, "Failed"), child("bad2", 2, "Failed"), child("bad3", 3, "Failed")]
    assert names(schedules.expired(children, 2, None, at("2026-03-01T11:00:00"))) == ["bad1"]


def test_retention_by_age() -> None:
    children = [child("a", 0), child("b", 30), child("c", 50)]
    doomed = schedules.expired(children, None, datetime.timedelta(minutes=20), at("2026-03-01T11:00:00"))
    assert names(doomed) == ["a", "b"]
    # The newest Succeeded one stays even when old.
    assert names(schedules.expired(children[:1], None, datetime.timedelta(minutes=1), at("2026-03-01T11:00:00"))) == []


def test_retention_skips_those_already_deleting() -> None:
    children = [child("a", 0, deleting=True), child("b", 1), child("c", 2)]
    assert names(schedules.expired(children, 1, None, at("2026-03-01T11:00:00"))) == ["b"]


def test_the_child_of_a_run() -> None:
    run = at("2026-03-01T02:00:00")
    body = schedules.child(schedule(), run)
    meta = body["metadata"]
    assert meta["name"] == f"nightly-{int(run.timestamp())}"
    assert meta["namespace"] == "shop"
    assert meta["labels"] == {"checkpointer.dev/schedule": "nightly"}
    assert meta["annotations"]["checkpointer.dev/scheduled-time"] == "2026-03-01T02:00:00.000000Z"
    owner = meta["ownerReferences"][0]
    assert owner["kind"] == "CheckpointSchedule" and owner["uid"] == "u-1"
    assert owner["controller"] is True and owner["blockOwnerDeletion"] is True
    assert body["spec"] == {"nodeName": "worker-1", "containers": ["db"]}
    cordon = schedules.child(schedule(), run, cordon=True)
    assert cordon["metadata"]["name"] == f"nightly-cordon-{int(run.timestamp())}"


def test_retention_settings() -> None:
    assert schedules.keep_last(schedule()) is None and schedules.max_age(schedule()) is None
    kept = schedule(retention={"keepLast": 3, "maxAge": "168h"})
    assert schedules.keep_last(kept) == 3
    assert schedules.max_age(kept) == datetime.timedelta(days=7)
    assert schedule().spec.concurrency_policy == ConcurrencyPolicy.FORBID
    assert schedule().spec.node_name == "worker-1"


def test_a_run_is_created_ahead_of_its_time_by_at_most_half_its_interval() -> None:
    hourly = Clock.of("0 * * * *", None)
    assert schedules.creation_time(hourly, at("2026-03-01T03:00:00")) == at("2026-03-01T02:59:30")
    every_minute = Clock.of("* * * * *", None)
    assert schedules.creation_time(every_minute, at("2026-03-01T03:00:00")) == at("2026-03-01T02:59:30")
    every_3s = Clock.of("*/3 * * * * *", None)
    assert schedules.creation_time(every_3s, at("2026-03-01T03:00:03")) == at("2026-03-01T03:00:01.500")


def test_the_agent_waits_for_the_scheduled_time_but_never_long() -> None:
    now = at("2026-03-01T03:00:00")
    annotation = schedules.SCHEDULED_TIME_ANNOTATION
    assert schedules.start_delay({annotation: "2026-03-01T03:00:12.500000Z"}, now) == 12.5
    assert schedules.start_delay({annotation: "2026-03-01T02:59:00Z"}, now) == 0
    assert schedules.start_delay({}, now) == 0
    assert schedules.start_delay({annotation: "not a time"}, now) == 0
    far = {annotation: "2027-03-01T03:00:00Z"}
    assert schedules.start_delay(far, now) == schedules.START_WAIT_LIMIT_SECONDS


def test_suspending_withdraws_only_what_has_not_started_and_is_still_ahead() -> None:
    now = at("2026-03-01T03:00:00")
    ahead = Child("n-1", "u1", at("2026-03-01T03:00:20"), phase="Scheduled")
    started = Child("n-2", "u2", at("2026-03-01T03:00:20"), phase="Checkpointing")
    due = Child("n-3", "u3", at("2026-03-01T02:59:59"), phase="Scheduled")
    deleting = Child("n-4", "u4", at("2026-03-01T03:00:20"), phase="Scheduled", deleting=True)
    assert schedules.waiting([ahead, started, due, deleting], now) == [ahead]


def test_a_schedule_counts_only_the_children_it_owns() -> None:
    """A tenant may label any checkpoint of its namespace `checkpointer.dev/schedule: <name>`, or give it an
    ownerReference: only one whose controlling owner is the schedule's uid counts (Forbid, retention)."""
    from checkpointer.controller.schedules import Schedules

    clock = Schedules(kube=None)  # type: ignore[arg-type]  # nothing here reads the API server
    clock.stopped = True  # no status writes: only what the clock remembers is looked at

    def child(name: str, owner: str | None, namespace: str = "shop") -> dict[str, Any]:
        refs = [{"uid": owner, "controller": True, "kind": "CheckpointSchedule", "name": "nightly"}] if owner else []
        labels = {schedules.SCHEDULE_LABEL: "nightly"}
        return {
            "metadata": {"name": name, "namespace": namespace, "uid": name, "labels": labels, "ownerReferences": refs}
        }

    # Seen before the schedule itself (the watches list in any order): kept aside, then judged by owner.
    clock.child_seen(child("early-labelled-only", None), gone=False)
    clock.child_seen(child("early-own", "u-1"), gone=False)
    entry = clock._adopt(("shop", "nightly"), schedule())
    assert set(entry.children) == {"early-own"}
    for name, owner in (("labelled-only", None), ("someone-elses", "u-2"), ("own", "u-1")):
        clock.child_seen(child(name, owner), gone=False)
    clock.child_seen(child("other-namespace", "u-1", namespace="team-b"), gone=False)
    assert set(entry.children) == {"early-own", "own"}
    clock.runs.shutdown()
    clock.writes.shutdown()
