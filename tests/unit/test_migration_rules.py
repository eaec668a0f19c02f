"""ContainerMigration decisions, pure: the target, when the restore starts, each step from the
children's state, the fallback on the source, and a schedule's migrations on cordon."""

from __future__ import annotations

import datetime
from typing import Any

from checkpointer.adapters.kube import NodeState
from checkpointer.adapters.podman import Container
from checkpointer.models import (
    CheckpointSchedule,
    Condition,
    ContainerMigration,
    ContainerRestore,
    MigrationStatus,
    Progress,
)
from checkpointer.reasons import Phase, Reason
from checkpointer.services import migration as rules
from checkpointer.services import schedule_rules
from checkpointer.services.migration import Children
from checkpointer.services.restore import stopped_self

UID = "11111111-2222-3333-4444-555555555555"


def body(status: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "checkpointer.dev/v1alpha1",
        "kind": "ContainerMigration",
        "metadata": {"name": "m", "namespace": "shop", "uid": UID},
        "spec": {"source": {"nodeName": "node-a", "container": "web"}, **spec},
        "status": status or {},
    }


def started(**status: Any) -> ContainerMigration:
    base = {
        "phase": "Pending",
        "checkpointRef": {"name": "m"},
        "sourceNodeName": "node-a",
        "targetNodeName": "node-b",
    }
    return ContainerMigration.model_validate(body({**base, **status}))


def child(kind: str, phase: str, name: str = "m", reason: str = "", message: str = "", **status: Any) -> dict[str, Any]:
    conditions = [{"type": "Ready", "reason": reason or phase, "message": message}] if phase else []
    return {
        "kind": kind,
        "metadata": {"name": name, "namespace": "shop", "ownerReferences": [rules.owner_reference(body())]},
        "status": {"phase": phase, "conditions": conditions, **status},
    }


def ccp(phase: str, **kw: Any) -> dict[str, Any]:
    return child("ContainerCheckpoint", phase, **kw)


def crst(phase: str, **kw: Any) -> dict[str, Any]:
    return child("ContainerRestore", phase, **kw)


def test_the_restore_starts_as_soon_as_the_checkpoint_exists_and_has_not_failed() -> None:
    for phase in ("", "Pending", "Scheduled", "Checkpointing", "Uploading", "Succeeded"):
        assert rules.restore_may_start(phase), phase
    assert not rules.restore_may_start("Failed")


def test_the_target_is_ready_not_cordoned_not_the_source_and_has_a_live_agent() -> None:
    nodes = [
        NodeState("node-a", True, False),
        NodeState("node-b", True, True),  # cordoned
        NodeState("node-c", False, False),  # not Ready
        NodeState("node-d", True, False),  # no agent
        NodeState("node-e", True, False),
    ]
    alive = {"node-a", "node-b", "node-c", "node-e"}.__contains__
    assert rules.choose_target("node-a", nodes, alive) == "node-e"
    assert rules.choose_target("node-e", nodes, alive) == "node-a"
    assert rules.choose_target("node-a", nodes[:4], alive) is None
    message = rules.no_target_message("node-a", nodes[:4])
    assert "cordoned: node-b" in message and "not Ready: node-c" in message


def test_a_target_that_is_the_source_is_refused() -> None:
    refusal = rules.target_refusal(ContainerMigration.model_validate(body(targetNodeName="node-a")))
    assert refusal is not None and refusal.reason == Reason.TARGET_IS_SOURCE
    assert rules.target_refusal(ContainerMigration.model_validate(body(targetNodeName="node-b"))) is None


def test_the_children_are_owned_by_the_migration_and_carry_its_flags() -> None:
    migration = body(storageRef={"name": "offsite"}, compress="none", tcpEstablished=True)
    checkpoint = rules.checkpoint_body(migration)
    assert checkpoint["spec"] == {
        "nodeName": "node-a",
        "containers": ["web"],
        "export": {"storageRef": {"name": "offsite"}},
        "compress": "none",
        "tcpEstablished": True,
    }
    [owner] = checkpoint["metadata"]["ownerReferences"]
    assert owner["uid"] == UID and owner["controller"] and owner["blockOwnerDeletion"]
    assert rules.owner_of(checkpoint) == ("m", UID) and rules.owned_by(checkpoint, UID)
    assert not rules.owned_by({"metadata": {}}, UID)
    restore = rules.restore_body(body(name="web2"), "node-b")
    assert restore["spec"] == {"nodeName": "node-b", "source": {"checkpointRef": {"name": "m"}}, "name": "web2"}
    back = rules.restore_body(body(name="web2"), "node-a", back=True)
    # Back on the source under its own name: it replaces the stopped container the checkpoint left.
    assert back["metadata"]["name"] == "m-back" and "name" not in back["spec"]
    assert rules.fallback_name("x" * 253).endswith("-back") and len(rules.fallback_name("x" * 253)) == 253


def test_the_phase_follows_the_checkpoint_then_the_restore() -> None:
    first = rules.step(started(), Children(ccp("Scheduled")))
    assert first is not None and first.phase == Phase.PENDING and first.create == "restore"
    m = started(restoreRef={"name": "m"})
    following = crst("Downloading")
    assert rules.step(m, Children(ccp("Scheduled"), following)).phase == Phase.PENDING  # type: ignore[union-attr]
    checkpointing = rules.step(m, Children(ccp("Checkpointing"), following))
    assert checkpointing is not None and checkpointing.phase == Phase.CHECKPOINTING and not checkpointing.create
    uploading = rules.step(m, Children(ccp("Uploading", progress={"bytesDone": 5, "bytesTotal": 9}), following))
    assert uploading is not None and uploading.phase == Phase.TRANSFERRING
    assert uploading.fields["progress"] == Progress(bytes_done=5, bytes_total=9)
    done = ccp("Succeeded", frozenTime="2026-12-07T10:00:00.000000Z")
    late = rules.step(started(), Children(done))
    assert late is not None and late.create == "restore" and late.fields["frozen_time"]
    assert rules.step(m, Children(done, crst("Downloading"))).phase == Phase.TRANSFERRING  # type: ignore[union-attr]
    assert rules.step(m, Children(done, crst("Restoring"))).phase == Phase.RESTORING  # type: ignore[union-attr]
    ok = rules.step(m, Children(done, crst("Succeeded", completionTime="2026-12-07T10:00:01.250000Z")))
    assert ok is not None and ok.phase == Phase.SUCCEEDED
    assert ok.fields["downtime_seconds"] == 1.25 and ok.fields["running_time"] == "2026-12-07T10:00:01.250000Z"
    # Podman's return on the target, when the restore says it, rather than its status write after.
    took = rules.step(m, Children(done, crst("Succeeded", runningTime="2026-12-07T10:00:01Z", completionTime="x")))
    assert took is not None and took.fields["downtime_seconds"] == 1.0
    assert rules.step(started(phase="Succeeded"), Children(done)) is None


def test_a_failed_checkpoint_fails_the_migration_with_its_reason() -> None:
    failed = rules.step(started(), Children(ccp("Failed", reason="ContainerNotPermitted", message="not yours")))
    assert failed is not None and failed.phase == Phase.FAILED and failed.reason == Reason.CONTAINER_NOT_PERMITTED
    assert "not yours" in failed.message and "nothing was restored on node-b" in failed.message
    gone = rules.step(started(), Children(None))
    assert gone is not None and gone.reason == Reason.CANCELLED


def test_a_restore_that_fails_for_good_is_followed_by_one_on_the_source() -> None:
    m = started(restoreRef={"name": "m"})
    done = ccp("Succeeded")
    lost = crst("Failed", reason="ImageNotFound", message="no image")
    back = rules.step(m, Children(done, lost))
    assert back is not None and back.create == "fallback" and back.phase == Phase.RESTORING
    m = started(restoreRef={"name": "m"}, fallbackRestoreRef={"name": "m-back"})
    home = rules.step(m, Children(done, lost, crst("Succeeded", name="m-back")))
    assert home is not None and home.phase == Phase.FAILED and home.reason == Reason.RESTORED_ON_SOURCE
    assert "ImageNotFound" in home.message and "runs there" in home.message and "node-a" in home.message
    neither = rules.step(m, Children(done, lost, crst("Failed", name="m-back", reason="RuntimeUnavailable")))
    assert neither is not None and neither.reason == Reason.RETURN_FAILED and "RuntimeUnavailable" in neither.message
    # Interrupted while podman restored: it may run on the target; a copy on the source could run beside it.
    unknown = rules.step(started(restoreRef={"name": "m"}), Children(done, crst("Failed", reason="RestoreInterrupted")))
    assert unknown is not None and unknown.phase == Phase.FAILED and unknown.create == ""
    # Interrupted, and the restarted agent found nothing of it running (and removed what podman made).
    undone = rules.step(started(restoreRef={"name": "m"}), Children(done, crst("Failed", reason="RestoreUndone")))
    assert undone is not None and undone.create == "fallback" and undone.phase == Phase.RESTORING


def test_only_changes_are_written() -> None:
    moved = Progress(bytes_done=1)
    found = rules.Step(Phase.TRANSFERRING, Reason.TRANSFERRING, "moving", fields={"progress": moved})
    ready = Condition(type="Ready", reason="Transferring", message="moving")
    status = MigrationStatus(phase="Transferring", conditions=[ready])
    assert rules.changed(status.model_copy(update={"progress": moved}), found) == {}
    assert rules.changed(status, found) == {"progress": moved}
    assert rules.changed(MigrationStatus(), found)["phase"] == "Transferring"


def test_a_restore_replaces_only_the_archives_own_stopped_container_of_its_namespace() -> None:
    config = {"id": "abc", "name": "web"}
    restore = ContainerRestore.model_validate(
        {
            "metadata": {"name": "r", "namespace": "shop"},
            "spec": {"nodeName": "node-a", "source": {"archive": {"key": "k"}}},
        }
    )
    own = (("checkpointer.dev/namespace", "shop"),)
    assert stopped_self(Container("abc", "web", "exited", labels=own), config, restore, frozenset())
    assert not stopped_self(Container("abc", "web", "running", labels=own), config, restore, frozenset())
    assert not stopped_self(Container("xyz", "web", "exited", labels=own), config, restore, frozenset())
    assert not stopped_self(Container("abc", "web", "exited"), config, restore, frozenset())
    assert stopped_self(Container("abc", "web", "exited"), config, restore, frozenset({"shop"}))
    named = restore.model_copy(update={"spec": restore.spec.model_copy(update={"name": "web"})})
    assert not stopped_self(Container("abc", "web", "exited", labels=own), config, named, frozenset())


def test_a_cordon_with_cordon_action_migrate_makes_one_migration_per_container() -> None:
    schedule = CheckpointSchedule.model_validate(
        {
            "metadata": {"name": "drain", "namespace": "shop", "uid": UID},
            "spec": {
                "schedule": "@daily",
                "onNodeCordon": True,
                "cordonAction": "Migrate",
                "template": {
                    "nodeName": "node-a",
                    "containers": ["web", "db"],
                    "export": {"storageRef": {"name": "offsite"}},
                    "compress": "gzip",
                },
            },
        }
    )
    run = datetime.datetime(2026, 12, 7, 10, tzinfo=datetime.UTC)
    web, db = schedule_rules.cordon_migrations(schedule, run)
    assert web["kind"] == "ContainerMigration" and web["metadata"]["name"] == f"drain-cordon-{int(run.timestamp())}-0"
    assert db["spec"] == {
        "source": {"nodeName": "node-a", "container": "db"},
        "storageRef": {"name": "offsite"},
        "compress": "gzip",
    }
    assert web["metadata"]["labels"] == {schedule_rules.SCHEDULE_LABEL: "drain"}
    assert web["metadata"]["ownerReferences"][0]["kind"] == "CheckpointSchedule"
    assert "targetNodeName" not in web["spec"]  # the controller chooses, never a cordoned node
