"""CheckpointSchedules against a real API server, podman and S3 (docs/api.md, CheckpointSchedule).

The schedules here use the 6-field cron form, seconds first (`*/3 * * * * *`), so that runs come
within seconds. One flow covers what waits on the clock: runs on time, Forbid while a checkpoint
stays active (its node's agent stopped), catch-up of one missed run across a controller restart,
the cordon trigger, suspend, retention with the bucket's contents, and garbage collection.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from helpers import apply, delete, events, finished, get, ready, unique, until, workload
from invariants import check_invariants
from localenv.env import LocalEnv

pytestmark = pytest.mark.e2e

KIND = "CheckpointSchedule"
SCHEDULE_LABEL = "checkpointer.dev/schedule"
SCHEDULED_TIME = "checkpointer.dev/scheduled-time"


def schedule(env: LocalEnv, name: str, spec: dict[str, Any]) -> None:
    apply(env, KIND, name, spec)


def template(node: str, container: str) -> dict[str, Any]:
    return {"nodeName": node, "containers": [container], "leaveRunning": True, "export": {}, "compress": "none"}


def children(env: LocalEnv, name: str) -> list[dict[str, Any]]:
    items = env.list_objects("containercheckpoints", "default", label_selector=f"{SCHEDULE_LABEL}={name}")
    return sorted(items, key=lambda o: o["metadata"]["name"])


def created_runs(env: LocalEnv, name: str) -> list[int]:
    """The unix times of the scheduled runs the schedule created, from its Created Events."""
    runs = []
    for message in events(env, name, "Created", kind=KIND):
        child = message.split()[2]  # created ContainerCheckpoint <name> for ...
        if "-cordon-" not in child:
            runs.append(int(child.rsplit("-", 1)[1]))
    return sorted(runs)


def stamp(text: str) -> float:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def set_cordon(env: LocalEnv, node: str, unschedulable: bool) -> None:
    env.kubectl("patch", "node", node, "--type=merge", "-p", json.dumps({"spec": {"unschedulable": unschedulable}}))


@pytest.fixture
def cordon_undone(local_env: LocalEnv) -> Iterator[None]:
    yield
    set_cordon(local_env, "node-a", False)


def test_a_schedule_runs_on_time_skips_catches_up_triggers_on_cordon_and_keeps_its_last(
    local_env: LocalEnv, cordon_undone: None
) -> None:
    env = local_env
    on_a, on_b, drained = (workload(env, node, mib=8) for node in ("node-a", "node-b", "node-a"))
    every3, forbid, drain = unique("every3"), unique("forbid"), unique("drain")
    # B's agent away: its first checkpoint stays Scheduled, and Forbid skips the runs after it.
    env.stop_agent("node-b")
    try:
        schedule(env, forbid, {"schedule": "*/2 * * * * *", "template": template("node-b", on_b)})
        schedule(
            env,
            every3,
            # Allow: the caught-up run below must not meet a checkpoint the stopped controller left unsigned.
            {
                "schedule": "*/3 * * * * *",
                "concurrencyPolicy": "Allow",
                "retention": {"keepLast": 2},
                "template": template("node-a", on_a),
            },
        )
        # Fires never on its own (1 January at midnight): only the cordon makes it checkpoint.
        schedule(env, drain, {"schedule": "0 0 1 1 *", "onNodeCordon": True, "template": template("node-a", drained)})
        skipped = until(
            "two Forbid skips",
            lambda: (found := events(env, forbid, "Skipped", kind=KIND)) and len(found) >= 2 and found,
        )
        [blocker] = children(env, forbid)
        assert all(blocker["metadata"]["name"] in m for m in skipped), skipped
        assert get(env, KIND, forbid)["status"]["activeCount"] == 1  # type: ignore[index]
    finally:
        env.start_agent("node-b")

    # On time: each checkpoint is created ahead of its second (by half the interval here, at most),
    # and its agent starts it within 2 s after that second, never before.
    until(
        "two runs started", lambda: len([c for c in children(env, every3) if c.get("status", {}).get("startTime")]) >= 2
    )
    for child in children(env, every3) + children(env, forbid):
        meta = child["metadata"]
        scheduled = stamp(meta["annotations"][SCHEDULED_TIME])
        # creationTimestamp has whole seconds: up to 1 s earlier than the creation itself.
        lateness = stamp(meta["creationTimestamp"]) - scheduled
        assert -2.5 <= lateness <= 2, f"{meta['name']} created {lateness:.1f}s after its time"
        owner = meta["ownerReferences"][0]
        assert (owner["kind"], owner["controller"], owner["blockOwnerDeletion"]) == (KIND, True, True)
        started = child.get("status", {}).get("startTime")
        if started and meta["labels"][SCHEDULE_LABEL] == every3:
            assert 0 <= stamp(started) - scheduled <= 2, (
                f"{meta['name']} started {stamp(started) - scheduled:.2f}s late"
            )
    delete(env, KIND, forbid)  # its checkpoints go with it: checked at the end, with the others'

    # Controller away across missed runs: one, the latest, is caught up; the others are not.
    before = set(created_runs(env, every3))
    env.stop_controller()
    stopped = time.time()
    # Long enough that a run is left out even after the one the stopped controller created ahead.
    time.sleep(7)
    env.start_controller()
    caught = until(
        "a caught-up run",
        lambda: [m for m in events(env, every3, "Created", kind=KIND) if "caught up" in m],
        timeout=45,
    )
    assert len(caught) == 1, caught
    caught_run = int(caught[0].split()[2].rsplit("-", 1)[1])
    assert caught_run > stopped
    # The runs made since: the caught-up one first, then the clock's own; the earlier missed ones never.
    made_since = sorted(set(created_runs(env, every3)) - before)
    assert made_since[0] == caught_run, made_since
    assert caught_run - max(before) >= 6, f"no run was left out: {sorted(before)} then {made_since}"

    # The cordon: one checkpoint per cordon, the next cordon another.
    set_cordon(env, "node-a", True)
    first = until("a cordon checkpoint", lambda: children(env, drain))
    assert len(first) == 1 and "-cordon-" in first[0]["metadata"]["name"]
    # Finished first, or Forbid would skip the next cordon's checkpoint.
    until("the cordon checkpoint finished", lambda: finished(get(env, "ccp", first[0]["metadata"]["name"]) or {}))
    set_cordon(env, "node-a", False)
    until("lastCordonTime cleared", lambda: "lastCordonTime" not in get(env, KIND, drain)["status"])  # type: ignore[index]
    set_cordon(env, "node-a", True)
    until("a second cordon checkpoint", lambda: len(children(env, drain)) == 2)
    time.sleep(1)
    assert len(children(env, drain)) == 2
    set_cordon(env, "node-a", False)

    # Suspended: nothing starts.
    env.kubectl("patch", "ccs", every3, "-n", "default", "--type=merge", "-p", '{"spec":{"suspend":true}}')
    until("Ready reason Suspended", lambda: ready(get(env, KIND, every3) or {}).get("reason") == "Suspended")
    time.sleep(0.5)  # the Created Event of a run that began just before
    made = created_runs(env, every3)
    time.sleep(3.5)
    assert created_runs(env, every3) == made

    # Retention: exactly keepLast finished checkpoints, and the bucket holds exactly their archives.
    def kept() -> list[dict[str, Any]] | None:
        found = children(env, every3)
        done = all(c.get("status", {}).get("phase") in ("Succeeded", "Failed") for c in found)
        return found if done and len(found) == 2 else None

    last = until("retention down to keepLast", kept)
    # Allow may overlap two runs on one container, and CRIU fails the second: still, one stays good.
    assert "Succeeded" in [c["status"]["phase"] for c in last]
    expected = {a["key"] for c in last for a in c["status"].get("archives") or []}
    folders = {key.rsplit("/", 1)[0] for key in expected}

    def bucket_folders() -> set[str]:
        listing = env.s3.client().list_objects_v2(Bucket=env.s3.bucket, Prefix=f"default/{every3}-")
        keys = {o["Key"] for o in listing.get("Contents", [])}
        return {k.rsplit("/", 1)[0] for k in keys} if expected <= keys else set()

    until("the bucket holds exactly the kept archives", lambda: bucket_folders() == folders, timeout=20)
    assert events(env, every3, "Deleted", kind=KIND)
    status = get(env, KIND, every3)["status"]  # type: ignore[index]
    assert status["lastSuccessfulTime"] and status["lastScheduleTime"] and status["activeCount"] == 0

    # The owner goes, its checkpoints with it (the garbage collector).
    delete(env, KIND, every3)
    delete(env, KIND, drain)
    left = lambda: children(env, every3) + children(env, drain) + children(env, forbid)  # noqa: E731
    until("every scheduled checkpoint gone", lambda: not left(), timeout=40, last=left)
    check_invariants(env)


BAD = [
    ({"schedule": "* * * *"}, "schedule must be a cron expression of 5 fields"),
    ({"schedule": "* * * * * * *"}, "schedule must be a cron expression of 5 fields"),
    ({"retention": {"maxAge": "7d"}}, "spec.retention.maxAge"),
    ({"concurrencyPolicy": "Replace"}, "spec.concurrencyPolicy"),
    ({"template": {"nodeName": "node-a", "containers": ["x"], "all": True}}, "set exactly one of containers"),
    ({"template": {"nodeName": "node-a", "all": True, "compress": "gzip"}}, "compress applies only to an exported"),
    ({"timeZone": "not a zone"}, "timeZone must be an IANA time zone name"),
]


def test_admission_and_a_schedule_the_controller_cannot_read(local_env: LocalEnv) -> None:
    from kubernetes import client, config

    api = client.CustomObjectsApi(config.new_client_from_config(str(local_env.kubeconfig)))  # type: ignore[no-untyped-call]

    def create(name: str, **spec: Any) -> None:
        body = {
            "apiVersion": "checkpointer.dev/v1alpha1",
            "kind": KIND,
            "metadata": {"name": name},
            "spec": {"schedule": "0 2 * * *", "template": {"nodeName": "node-a", "all": True}, **spec},
        }
        api.create_namespaced_custom_object("checkpointer.dev", "v1alpha1", "default", "checkpointschedules", body)

    for spec, message in BAD:
        with pytest.raises(ApiException) as refused:
            create(unique("bad"), **spec)
        assert refused.value.status == 422 and message in str(refused.value.body), (spec, refused.value.body)
    with pytest.raises(ApiException) as refused:
        create("n" * 64)
    assert "at most 63 characters" in str(refused.value.body)

    # Five fields pass admission, but there is no minute 61: Ready=False, an Event, and no crash.
    broken = unique("broken")
    create(broken, schedule="61 * * * *", timeZone="Europe/Berlin")
    condition = until(
        "Ready=False InvalidSchedule",
        lambda: (c := ready(get(local_env, KIND, broken) or {})).get("reason") == "InvalidSchedule" and c,
        timeout=15,
    )
    assert condition["status"] == "False" and "61 * * * *" in condition["message"]
    assert events(local_env, broken, "InvalidSchedule", kind=KIND)
    # Repaired, it becomes Ready; the printer columns show it.
    local_env.kubectl(
        "patch", "ccs", broken, "-n", "default", "--type=merge", "-p", '{"spec":{"schedule":"0 2 * * *"}}'
    )
    until("Ready=True Active", lambda: ready(get(local_env, KIND, broken) or {}).get("reason") == "Active", timeout=15)
    table = local_env.kubectl("get", "ccs", broken, "-n", "default").stdout
    assert table.split("\n")[0].split() == ["NAME", "SCHEDULE", "SUSPEND", "LAST", "ACTIVE", "AGE"]
    delete(local_env, KIND, broken)
