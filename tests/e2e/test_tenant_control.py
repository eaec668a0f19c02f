"""Nothing a tenant writes on their own objects moves them to another node or stops the controller.

As alice, who may edit only team-a: a checkpoint relabelled for another node while it waits for its
scheduled time is acted on by no other node's agent, and the controller puts its label back; a
checkpoint created with kopf's annotations under the controller's prefix is scheduled all the same.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterator
from typing import Any

import pytest

from helpers import ready, remove, state, unique, until
from invariants import check_invariants
from localenv.images import COUNTER, owned_by, read_count
from tenants import NODE, TEAM_A, Tenants

pytestmark = pytest.mark.e2e

NODE_LABEL = "checkpointer.dev/node"
SCHEDULED_TIME = "checkpointer.dev/scheduled-time"
CONTROLLER = "controller.checkpointer.dev"
CCP = "containercheckpoints.checkpointer.dev"


def create_as_alice(t: Tenants, node: str, spec: dict[str, Any], annotations: dict[str, str]) -> str:
    name = unique("ccp")
    obj = {
        "apiVersion": "checkpointer.dev/v1alpha1",
        "kind": "ContainerCheckpoint",
        "metadata": {"name": name, "namespace": TEAM_A, "annotations": annotations},
        "spec": {"nodeName": node, **spec},
    }
    t.env.control_plane.kubectl("create", "-f", "-", kubeconfig=t.alice, input=json.dumps(obj))
    return name


def get_as_alice(t: Tenants, name: str) -> dict[str, Any]:
    out = t.env.control_plane.kubectl("get", CCP, name, "-n", TEAM_A, "-o", "json", kubeconfig=t.alice)
    obj: dict[str, Any] = json.loads(out.stdout)
    return obj


@pytest.fixture
def twins(tenants: Tenants) -> Iterator[str]:
    """A running counter of team-a under one name on both nodes."""
    name, nodes = unique("twin"), ("node-a", "node-b")
    try:
        for node in nodes:
            tenants.env.nodes[node].podman("run", "-d", *owned_by(TEAM_A), "--name", name, COUNTER)
            read_count(tenants.env.nodes[node], name)
        yield name
    finally:
        for node in nodes:
            remove(tenants.env, node, name)


def test_a_relabelled_checkpoint_runs_only_on_its_own_node(tenants: Tenants, twins: str) -> None:
    t, env = tenants, tenants.env
    other = env.nodes["node-b"]
    started_there = other.podman("inspect", "--format", "{{.State.StartedAt}}", twins).stdout
    count_there = read_count(other, twins)
    # Some seconds ahead: the checkpoint waits Scheduled on node-a while alice relabels it and the
    # controller puts the label back (2 to 3 s on a loaded machine; the wait below fails if it ran first).
    at = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=12)
    name = create_as_alice(
        t, "node-a", {"containers": [twins], "export": {}}, {SCHEDULED_TIME: at.strftime("%Y-%m-%dT%H:%M:%SZ")}
    )
    env.wait_phase("ccp", name, ["Scheduled"], namespace=TEAM_A, timeout=30)
    env.control_plane.kubectl(
        "label", "--overwrite", CCP, name, "-n", TEAM_A, f"{NODE_LABEL}=node-b", kubeconfig=t.alice
    )

    # The controller puts the label back to the node it scheduled, and says so.
    until(
        "the label back on node-a",
        lambda: (
            (o := get_as_alice(t, name))["metadata"]["labels"][NODE_LABEL] == "node-a"
            and o["status"]["phase"] == "Scheduled"
        ),
    )
    events = env.list_objects("events", TEAM_A, f"involvedObject.name={name}")
    [restored] = [e for e in events if e["reason"] == "NodeLabelRestored"]
    assert restored["type"] == "Warning" and "node-b" in restored["message"], restored

    obj = t.finished("ccp", TEAM_A, name)
    assert obj["status"]["phase"] == "Succeeded", obj["status"]
    assert obj["status"]["nodeName"] == obj["spec"]["nodeName"] == obj["metadata"]["labels"][NODE_LABEL] == "node-a"
    [archive] = obj["status"]["archives"]
    key = archive["key"].rsplit("/", 1)[0] + "/manifest.json"
    manifest = json.loads(env.s3.client().get_object(Bucket=env.s3.bucket, Key=key)["Body"].read())
    assert manifest["nodeName"] == manifest["host"]["node"] == "node-a", manifest["host"]

    # node-b's agent never acted: its container of the same name runs on, untouched.
    assert state(env, "node-b", twins) == "running"
    assert other.podman("inspect", "--format", "{{.State.StartedAt}}", twins).stdout == started_there
    assert read_count(other, twins) > count_there
    t.delete("ccp", name)
    check_invariants(env)


def test_kopf_annotations_written_by_a_tenant_do_not_stop_the_controller(tenants: Tenants) -> None:
    t = tenants
    spec = {"containers": [t.ours], "leaveRunning": True}
    done = {
        "started": "2026-01-01T00:00:00.000000+00:00",
        "stopped": "2026-01-01T00:00:01.000000+00:00",
        "purpose": "create",
        "retries": 1,
        "success": True,
        "failure": False,
        "message": None,
    }
    forged = {
        # What kopf would have written had it handled the object: its configuration, and the handlers done.
        f"{CONTROLLER}/last-handled-configuration": json.dumps({"spec": {"nodeName": NODE, **spec}}),
        f"{CONTROLLER}/schedule_checkpoint": json.dumps(done),
        "agent.checkpointer.dev/take_checkpoint": json.dumps(done),
    }
    name = create_as_alice(t, NODE, spec, forged)
    obj = t.finished("ccp", TEAM_A, name)
    assert obj["status"]["phase"] == "Succeeded", obj["status"]
    assert ready(obj)["reason"] == "Succeeded"
    # A status write of the controller or an agent carries the resourceVersion it read (status.py): once
    # the name belongs to an object made anew, that version is refused, whatever the new one's phase.
    read = obj["metadata"]["resourceVersion"]
    t.delete("ccp", name)
    again = {**json.loads(json.dumps(obj)), "metadata": {"name": name, "namespace": TEAM_A}, "status": {}}
    t.env.control_plane.kubectl("create", "-f", "-", kubeconfig=t.alice, input=json.dumps(again))
    stale = {"metadata": {"resourceVersion": read}, "status": {"progress": {"bytesDone": 1}}}
    out = t.env.kubectl(
        "patch", CCP, name, "-n", TEAM_A, "--subresource=status", "--type=merge", "-p", json.dumps(stale), check=False
    )
    assert out.returncode != 0 and "Conflict" in out.stderr, out.stderr
    assert t.finished("ccp", TEAM_A, name)["status"].get("progress") != {"bytesDone": 1}
    t.delete("ccp", name)
    check_invariants(t.env)
