"""ContainerMigration end to end: a counter moves from node-a to node-b as one object, its count goes
on, and the downtime in status is the one the counter's own output shows; a migration without a
target goes to the node the controller chooses, never a cordoned one; admission refuses bad specs."""

from __future__ import annotations

import json
from typing import Any

import pytest

from helpers import (
    apply,
    assert_runs_on_exactly_one_node,
    counter,
    counts_with_times,
    events,
    get,
    migration,
    reason_and_message,
    remove,
    running_on,
    unique,
    until,
)
from localenv.env import LocalEnv
from localenv.images import read_count

pytestmark = pytest.mark.e2e
SOURCE, TARGET = "node-a", "node-b"


def owned(env: LocalEnv, kind: str, name: str, owner: dict[str, Any]) -> dict[str, Any]:
    obj = get(env, kind, name)
    assert obj is not None, f"{kind} {name} does not exist"
    [ref] = obj["metadata"]["ownerReferences"]
    assert (ref["kind"], ref["uid"], ref["controller"]) == ("ContainerMigration", owner["metadata"]["uid"], True)
    return obj


def test_a_counter_moves_to_node_b_as_one_migration_with_the_downtime_it_had(local_env: LocalEnv) -> None:
    env = local_env
    container = counter(env, SOURCE, running_for=1)
    try:
        name = migration(env, SOURCE, container, targetNodeName=TARGET)
        obj = env.wait_phase("cmig", name, ["Succeeded", "Failed"])
        status = obj["status"]
        assert status["phase"] == "Succeeded", status
        assert (status["sourceNodeName"], status["targetNodeName"]) == (SOURCE, TARGET)
        checkpoint = owned(env, "ccp", status["checkpointRef"]["name"], obj)
        restore = owned(env, "crst", status["restoreRef"]["name"], obj)
        assert checkpoint["status"]["phase"] == restore["status"]["phase"] == "Succeeded"
        assert status["frozenTime"] == checkpoint["status"]["frozenTime"]
        assert status["runningTime"] == restore["status"]["runningTime"] <= restore["status"]["completionTime"]
        assert status["progress"]["bytesDone"] > 0

        # The count goes on from where it stopped: the shell's memory moved.
        before = counts_with_times(env, SOURCE, container)
        last_time, last = before[-1]
        assert read_count(env.nodes[TARGET], container) > last
        after = [(t, c) for t, c in counts_with_times(env, TARGET, container) if c > last]
        first_time, first = after[0]
        assert first == last + 1, f"the count jumped from {last} to {first}"
        # The counter writes every 0.2 s: from its last line on node-a to its next on node-b it was down.
        observed = first_time - last_time
        reported = status["downtimeSeconds"]
        assert abs(observed - reported) < 1.0, f"downtime observed {observed:.2f}s, reported {reported:.2f}s"
        print(f"downtime observed {observed:.3f}s, reported {reported:.3f}s")
        assert_runs_on_exactly_one_node(env, container, TARGET)
    finally:
        remove(env, SOURCE, container)
        remove(env, TARGET, container)


def cordon(env: LocalEnv, node: str, on: bool) -> None:
    env.kubectl("patch", "node", node, "-p", json.dumps({"spec": {"unschedulable": on}}))


def test_without_a_target_the_controller_chooses_one_and_never_a_cordoned_node(local_env: LocalEnv) -> None:
    env = local_env
    container = counter(env, SOURCE)
    cordon(env, TARGET, True)
    try:
        refused = migration(env, SOURCE, container)
        obj = env.wait_phase("cmig", refused, ["Succeeded", "Failed"])
        reason, message = reason_and_message(obj)
        assert reason == "NoTargetNode", obj["status"]
        assert f"cordoned: {TARGET}" in message
        assert "checkpointRef" not in obj["status"] and get(env, "ccp", refused) is None
        assert running_on(env, container) == [SOURCE]  # never touched

        cordon(env, TARGET, False)
        name = migration(env, SOURCE, container)
        obj = env.wait_phase("cmig", name, ["Succeeded", "Failed"])
        assert obj["status"]["phase"] == "Succeeded", obj["status"]
        assert obj["status"]["targetNodeName"] == TARGET
        [chosen] = events(env, name, "TargetChosen", "ContainerMigration")
        assert f"chose node {TARGET}" in chosen
        assert_runs_on_exactly_one_node(env, container, TARGET)

        # Back again, to the source: the target named is the source node, refused before anything stops.
        same = migration(env, TARGET, container, targetNodeName=TARGET)
        obj = env.wait_phase("cmig", same, ["Succeeded", "Failed"])
        assert reason_and_message(obj)[0] == "TargetIsSource", obj["status"]
        assert_runs_on_exactly_one_node(env, container, TARGET)
    finally:
        cordon(env, TARGET, False)
        remove(env, SOURCE, container)
        remove(env, TARGET, container)


BAD = [
    ({"source": {"nodeName": SOURCE}}, "spec.source.container: Required value"),
    ({"source": {"nodeName": "Node_A", "container": "web"}}, "source.nodeName must be the name of a Node"),
    ({"source": {"nodeName": SOURCE, "container": "-web"}}, "source.container must be a podman container name"),
    (
        {"source": {"nodeName": SOURCE, "container": "web"}, "name": "w", "tcpEstablished": True},
        "name cannot be combined with tcpEstablished",
    ),
    ({"source": {"nodeName": SOURCE, "container": "web"}, "compress": "lz4"}, 'supported values: "zstd"'),
    ({"source": {"nodeName": SOURCE, "container": "web"}, "ttl": "1 day"}, "spec.ttl in body should match"),
    ({"source": {"nodeName": SOURCE, "container": "web"}, "targetNodeName": "b\nc"}, "targetNodeName must be"),
]


@pytest.mark.parametrize(("spec", "words"), BAD, ids=[w for _, w in BAD])
def test_admission_refuses_a_bad_migration_with_a_message_that_says_what_to_change(
    local_env: LocalEnv, spec: dict[str, Any], words: str
) -> None:
    manifest = {
        "apiVersion": "checkpointer.dev/v1alpha1",
        "kind": "ContainerMigration",
        "metadata": {"name": unique("bad"), "namespace": "default"},
        "spec": spec,
    }
    out = local_env.kubectl("apply", "-f", "-", input=json.dumps(manifest), check=False)
    assert out.returncode != 0 and words in out.stderr, out.stderr


def test_a_migrations_spec_cannot_change(local_env: LocalEnv) -> None:
    env = local_env
    name = unique("cmig")
    # A container that does not exist: the checkpoint fails at once, nothing moves.
    apply(env, "ContainerMigration", name, {"source": {"nodeName": SOURCE, "container": "absent"}})
    obj = env.wait_phase("cmig", name, ["Succeeded", "Failed"])
    assert reason_and_message(obj)[0] == "ContainerNotFound", obj["status"]
    patch = json.dumps({"spec": {"targetNodeName": TARGET}})
    out = env.kubectl("patch", "cmig", name, "--type=merge", "-p", patch, check=False)
    assert out.returncode != 0 and "spec is immutable; delete and recreate the ContainerMigration" in out.stderr


def test_draining_a_node_moves_its_containers_when_the_schedule_says_migrate(local_env: LocalEnv) -> None:
    env = local_env
    container = counter(env, SOURCE, running_for=1)
    schedule = unique("drain")
    template = {"nodeName": SOURCE, "containers": [container], "export": {}}
    # Fires never on its own (1 January at midnight): only the cordon moves the counter.
    spec = {"schedule": "0 0 1 1 *", "onNodeCordon": True, "cordonAction": "Migrate", "template": template}
    apply(env, "CheckpointSchedule", schedule, spec)
    try:
        cordon(env, SOURCE, True)
        listed = ["cmig", "-n", "default", "-l", f"checkpointer.dev/schedule={schedule}", "-o", "json"]

        def made() -> list[dict[str, Any]]:
            return list(json.loads(env.kubectl("get", *listed).stdout)["items"])

        [moved] = until("the cordon's migration", made, timeout=60)
        assert moved["spec"]["source"] == {"nodeName": SOURCE, "container": container}
        obj = env.wait_phase("cmig", moved["metadata"]["name"], ["Succeeded", "Failed"])
        assert obj["status"]["phase"] == "Succeeded", obj["status"]
        assert obj["status"]["targetNodeName"] == TARGET  # the only node not cordoned
        assert_runs_on_exactly_one_node(env, container, TARGET)
    finally:
        cordon(env, SOURCE, False)
        env.kubectl("delete", "ccs", schedule, "-n", "default", "--wait=false", check=False)
        remove(env, SOURCE, container)
        remove(env, TARGET, container)
