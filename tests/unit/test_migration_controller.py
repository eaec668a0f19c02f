"""The controller's side of a migration against an API server in memory: what it creates, in which
order, and what it writes, as its children move on (the decisions themselves: test_migration_rules)."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import pytest
from kubernetes.client import ApiException

from checkpointer.adapters.kube import CHECKPOINTS, MIGRATIONS, RESTORES, NodeState
from checkpointer.models import Metadata
from checkpointer.services.migration import Migrations
from checkpointer.services.scheduling import AgentLeases


class FakeKube:
    """The few calls a migration makes, on dicts; resourceVersions checked as the API server does."""

    def __init__(self, nodes: list[NodeState], agents: set[str]) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.nodes = nodes
        self.agents = agents
        self.versions = itertools.count(1)

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        found = self.objects.get((plural, namespace, name))
        return copy.deepcopy(found) if found else None

    def create(self, plural: str, namespace: str, body: dict[str, Any]) -> dict[str, Any] | None:
        key = (plural, namespace, body["metadata"]["name"])
        if key in self.objects:
            return None
        made = copy.deepcopy(body)
        made["metadata"] |= {"uid": f"uid-{next(self.versions)}", "resourceVersion": str(next(self.versions))}
        self.objects[key] = made
        return copy.deepcopy(made)

    def patch_status(
        self, plural: str, namespace: str, name: str, status: dict[str, Any], resource_version: str = ""
    ) -> dict[str, Any]:
        obj = self.objects.get((plural, namespace, name))
        if obj is None:
            raise ApiException(status=404)
        if resource_version and resource_version != obj["metadata"]["resourceVersion"]:
            raise ApiException(status=409)
        obj["status"] = {**(obj.get("status") or {}), **status}
        obj["metadata"]["resourceVersion"] = str(next(self.versions))
        return copy.deepcopy(obj)

    def set_phase(self, plural: str, name: str, phase: str, reason: str = "", **status: Any) -> None:
        obj = self.objects[(plural, "shop", name)]
        conditions = [{"type": "Ready", "reason": reason or phase, "message": f"{phase} message"}]
        obj["status"] = {**(obj.get("status") or {}), "phase": phase, "conditions": conditions, **status}

    def node_states(self) -> list[NodeState]:
        return self.nodes

    def node_exists(self, name: str) -> bool:
        return any(n.name == name for n in self.nodes)

    def lease_age(self, namespace: str, name: str) -> tuple[float, int] | None:
        return (1.0, 20) if name.removeprefix("checkpointer-agent-") in self.agents else None


@pytest.fixture(autouse=True)
def events(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, str]]:
    """The Events the migration posts, as (object, reason, message)."""
    posted: list[tuple[str, str, str]] = []

    def post(kind: str, meta: Metadata, type_: str, reason: str, message: str) -> None:
        posted.append((meta.name, reason, message))

    monkeypatch.setattr("checkpointer.services.migration.post_event", post)
    return posted


def setup(**spec: Any) -> tuple[FakeKube, Migrations]:
    nodes = [NodeState("node-a", True, False), NodeState("node-b", True, False), NodeState("node-c", True, True)]
    kube = FakeKube(nodes, {"node-a", "node-b", "node-c"})
    body = {
        "apiVersion": "checkpointer.dev/v1alpha1",
        "kind": "ContainerMigration",
        "metadata": {"name": "m", "namespace": "shop"},
        "spec": {"source": {"nodeName": "node-a", "container": "web"}, **spec},
    }
    kube.create(MIGRATIONS, "shop", body)
    return kube, Migrations(kube, AgentLeases(kube, "ops"))  # type: ignore[arg-type]


def migration(kube: FakeKube) -> dict[str, Any]:
    found = kube.get(MIGRATIONS, "shop", "m")
    assert found is not None
    return found


def advance(kube: FakeKube, migrations: Migrations, child: tuple[str, str] | None = None) -> dict[str, Any]:
    if child is None:
        migrations.advance(migration(kube))
    else:
        found = kube.get(child[0], "shop", child[1])
        assert found is not None
        migrations.child_changed(found)
    return migration(kube)["status"]


def test_a_migration_moves_through_its_checkpoint_and_its_restore(events: list[tuple[str, str, str]]) -> None:
    kube, migrations = setup()
    status = advance(kube, migrations)
    # The target chosen (node-c is cordoned), said in status and an Event, and the checkpoint made.
    assert status["phase"] == "Pending" and status["targetNodeName"] == "node-b"
    assert ("m", "TargetChosen", "chose node node-b: Ready, not cordoned, with a live agent") in events
    checkpoint = kube.get(CHECKPOINTS, "shop", "m")
    assert (
        checkpoint is not None
        and checkpoint["metadata"]["ownerReferences"][0]["uid"] == migration(kube)["metadata"]["uid"]
    )
    assert kube.get(RESTORES, "shop", "m") is None

    # The restore is made on the checkpoint's first event: it follows the checkpoint while it runs.
    kube.set_phase(CHECKPOINTS, "m", "Checkpointing")
    status = advance(kube, migrations, (CHECKPOINTS, "m"))
    assert status["phase"] == "Checkpointing" and status["restoreRef"] == {"name": "m"}
    restore = kube.get(RESTORES, "shop", "m")
    assert restore is not None and restore["spec"]["nodeName"] == "node-b"
    assert restore["spec"]["source"] == {"checkpointRef": {"name": "m"}}
    kube.set_phase(RESTORES, "m", "Downloading")
    assert advance(kube, migrations, (RESTORES, "m"))["phase"] == "Checkpointing"
    kube.set_phase(CHECKPOINTS, "m", "Uploading", frozenTime="2026-12-07T10:00:00Z", progress={"bytesDone": 7})
    status = advance(kube, migrations, (CHECKPOINTS, "m"))
    assert status["phase"] == "Transferring" and status["progress"] == {"bytesDone": 7}

    kube.set_phase(CHECKPOINTS, "m", "Succeeded")
    status = advance(kube, migrations, (CHECKPOINTS, "m"))
    assert status["phase"] == "Transferring" and status["frozenTime"] == "2026-12-07T10:00:00Z"
    # An event of its own status write changes nothing more.
    advance(kube, migrations)
    assert kube.get(RESTORES, "shop", "m-back") is None

    kube.set_phase(RESTORES, "m", "Restoring")
    assert advance(kube, migrations, (RESTORES, "m"))["phase"] == "Restoring"
    kube.set_phase(RESTORES, "m", "Succeeded", completionTime="2026-12-07T10:00:02.5Z")
    status = advance(kube, migrations, (RESTORES, "m"))
    assert status["phase"] == "Succeeded" and status["downtimeSeconds"] == 2.5
    assert status["runningTime"] == "2026-12-07T10:00:02.5Z" and status["completionTime"]


def test_a_restore_that_fails_on_the_target_is_made_again_on_the_source() -> None:
    kube, migrations = setup(targetNodeName="node-b")
    advance(kube, migrations)
    kube.set_phase(CHECKPOINTS, "m", "Succeeded")
    advance(kube, migrations, (CHECKPOINTS, "m"))
    kube.set_phase(RESTORES, "m", "Failed", reason="ImageNotFound")
    status = advance(kube, migrations, (RESTORES, "m"))
    back = kube.get(RESTORES, "shop", "m-back")
    assert back is not None and back["spec"]["nodeName"] == "node-a" and status["phase"] == "Restoring"
    assert status["fallbackRestoreRef"] == {"name": "m-back"}
    kube.set_phase(RESTORES, "m-back", "Succeeded")
    status = advance(kube, migrations, (RESTORES, "m-back"))
    assert status["phase"] == "Failed" and status["conditions"][0]["reason"] == "RestoredOnSource"


def test_a_bad_target_or_a_name_taken_stops_it_before_anything_is_made() -> None:
    kube, migrations = setup(targetNodeName="node-a")
    status = advance(kube, migrations)
    assert status["phase"] == "Failed" and status["conditions"][0]["reason"] == "TargetIsSource"
    assert kube.get(CHECKPOINTS, "shop", "m") is None

    kube, migrations = setup(targetNodeName="node-z")
    assert advance(kube, migrations)["conditions"][0]["reason"] == "NodeNotFound"

    kube, migrations = setup()
    kube.create(CHECKPOINTS, "shop", {"metadata": {"name": "m"}, "spec": {}})  # someone else's
    status = advance(kube, migrations)
    assert status["phase"] == "Failed" and status["conditions"][0]["reason"] == "NameTaken"

    kube, migrations = setup()
    kube.nodes = [NodeState("node-a", True, False), NodeState("node-b", True, True)]
    status = advance(kube, migrations)
    assert (
        status["conditions"][0]["reason"] == "NoTargetNode" and "cordoned: node-b" in status["conditions"][0]["message"]
    )


def test_a_checkpoint_made_before_a_restart_is_taken_as_the_migrations_own() -> None:
    kube, migrations = setup()
    advance(kube, migrations)
    first = kube.get(CHECKPOINTS, "shop", "m")
    # The status write was lost (say the controller died right after the create): the next event starts again.
    kube.objects[(MIGRATIONS, "shop", "m")]["status"] = {}
    status = advance(kube, migrations)
    assert status["phase"] == "Pending" and kube.get(CHECKPOINTS, "shop", "m") == first


def test_a_step_the_api_server_did_not_answer_is_asked_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("checkpointer.services.migration.RETRY_DELAYS", (0, 0))
    kube, migrations = setup()
    answers = iter([ApiException(status=503), ConnectionResetError("gone")])
    real = kube.get

    def flaky(plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        failure = next(answers, None)
        if failure is not None:
            raise failure
        return real(plural, namespace, name)

    kube.get = flaky  # type: ignore[method-assign]
    migrations.advance(real(MIGRATIONS, "shop", "m") or {})
    assert migration(kube)["status"]["phase"] == "Pending"
