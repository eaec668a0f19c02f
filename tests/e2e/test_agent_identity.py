"""An agent acts only for its own node: the chart's admission policy, on the real API server.

The local environment's agents authenticate as the chart's agent ServiceAccount with a token bound to
a Pod on their node (`LocalEnv.agent_kubeconfig`), so the API server knows each agent's node from its
token, as it knows it from the token a kubelet projects into the agent's Pod. Here node-a's very
credentials try to write node-b's objects and Lease.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import GROUP, PLURAL, VERSION, Agent, refused, unique, until
from localenv.chart import AGENT_SA
from localenv.controlplane import ControlPlane
from localenv.env import NAMESPACE, LocalEnv

pytestmark = pytest.mark.e2e

CCP = f"{PLURAL}.{GROUP}"
LEASES = "leases.coordination.k8s.io"
NODE_LABEL = "checkpointer.dev/node"


@pytest.fixture(scope="module")
def plane(local_env: LocalEnv) -> ControlPlane:
    if not isinstance(local_env.control_plane, ControlPlane):
        pytest.skip("on kind the agents' tokens are the kubelet's; this test makes its own")
    return local_env.control_plane


def checkpoint_object(name: str, node: str, label: str | None = None) -> dict[str, Any]:
    """A checkpoint of a container that does not exist: it fails at once, and nothing on the node changes."""
    return {
        "apiVersion": "checkpointer.dev/v1alpha1",
        "kind": "ContainerCheckpoint",
        "metadata": {"name": name, "namespace": "default", "labels": {NODE_LABEL: label} if label else {}},
        "spec": {"nodeName": node, "containers": [f"absent-{name}"]},
    }


@pytest.fixture
def objects(local_env: LocalEnv) -> Iterator[dict[str, str]]:
    """One failed ContainerCheckpoint for each node (the controller labels them), deleted afterwards."""
    names = {node: unique(f"identity-{node}") for node in ("node-a", "node-b")}
    local_env.apply(*(checkpoint_object(name, node) for node, name in names.items()))
    try:
        for name in names.values():
            local_env.wait_phase("ccp", name, ["Failed"], timeout=90)
        yield names
    finally:
        local_env.kubectl("delete", CCP, *names.values(), "-n", "default", "--ignore-not-found", "--timeout=60s")


def test_node_a_agent_writes_only_node_a_objects_and_lease(
    local_env: LocalEnv, plane: ControlPlane, objects: dict[str, str]
) -> None:
    kubeconfig = local_env.agent_kubeconfig("node-a")
    # The credentials node-a's agent itself runs with.
    assert f"KUBECONFIG={kubeconfig}" in _environ_of(local_env, "agent-node-a")
    node_a = Agent(kubeconfig)
    mine, theirs = objects["node-a"], objects["node-b"]

    # Node-b's object: neither its status nor the object itself.
    assert refused(lambda: node_a.patch(theirs, {"status": {"phase": "Succeeded"}}, status=True)) == (
        "the checkpointer agent of node node-a may write only ContainerCheckpoints and ContainerRestores labelled "
        f"{NODE_LABEL}=node-a; containercheckpoints/status default/{theirs} is labelled {NODE_LABEL}=node-b"
    )
    annotate = {"metadata": {"annotations": {"test.checkpointer.dev/by": "node-a"}}}
    message = refused(lambda: node_a.patch(theirs, annotate))
    assert message.endswith(f"containercheckpoints default/{theirs} is labelled {NODE_LABEL}=node-b"), message
    # Nor taking it over by relabelling it, nor giving its own away.
    message = refused(lambda: node_a.patch(theirs, _label("node-a")))
    assert message.endswith(f"default/{theirs} would change its label {NODE_LABEL} from node-b to node-a"), message
    message = refused(lambda: node_a.patch(mine, _label("node-b")))
    assert message.endswith(f"default/{mine} would change its label {NODE_LABEL} from node-a to node-b"), message
    message = refused(lambda: node_a.patch(theirs, _label(None)))
    assert message.endswith(f"would change its label {NODE_LABEL} from node-b to (none)"), message
    got = json.loads(local_env.kubectl("get", CCP, theirs, "-n", "default", "-o", "json").stdout)
    assert got["status"]["phase"] == "Failed" and got["metadata"]["labels"][NODE_LABEL] == "node-b"
    assert "test.checkpointer.dev/by" not in got["metadata"].get("annotations", {})

    # Its own object: both.
    node_a.patch(mine, annotate)
    node_a.patch(mine, {"status": {"startTime": "2020-01-01T00:00:00Z"}}, status=True)
    got = json.loads(local_env.kubectl("get", CCP, mine, "-n", "default", "-o", "json").stdout)
    assert got["metadata"]["annotations"]["test.checkpointer.dev/by"] == "node-a"
    assert got["status"]["startTime"] == "2020-01-01T00:00:00Z"

    # Leases: renewing node-b's, or making one for another node, is refused; its own it renews.
    renew = {"spec": {"holderIdentity": "node-a"}}
    assert refused(lambda: node_a.leases.patch_namespaced_lease("checkpointer-agent-node-b", NAMESPACE, renew)) == (
        f"the checkpointer agent of node node-a may renew only its own Lease {NAMESPACE}/checkpointer-agent-node-a, "
        f"not {NAMESPACE}/checkpointer-agent-node-b"
    )
    holder = local_env.kubectl(
        "get", LEASES, "checkpointer-agent-node-b", "-n", NAMESPACE, "-o", "jsonpath={.spec.holderIdentity}"
    )
    assert holder.stdout == "node-b"
    lease = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "checkpointer-agent-node-c", "namespace": NAMESPACE},
        "spec": {"holderIdentity": "node-a", "leaseDurationSeconds": 20},
    }
    message = refused(lambda: node_a.leases.create_namespaced_lease(NAMESPACE, lease))
    assert message.endswith(f"not {NAMESPACE}/checkpointer-agent-node-c"), message
    node_a.leases.patch_namespaced_lease("checkpointer-agent-node-a", NAMESPACE, renew)

    # Its Events are no concern of the policy.
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{mine}.identity", "namespace": "default"},
        "involvedObject": {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ContainerCheckpoint", "name": mine},
        "reason": "Probe",
        "message": "an Event of node-a's agent",
        "type": "Normal",
    }
    node_a.core.create_namespaced_event("default", event)


def test_creating_is_judged_by_the_label_too(local_env: LocalEnv, plane: ControlPlane) -> None:
    """RBAC grants the agent no create; granted here for a moment, the policy alone still confines it."""
    node_a = Agent(local_env.agent_kubeconfig("node-a"))
    grant = unique("identity-create")
    local_env.kubectl("create", "role", grant, "-n", "default", "--verb=create", f"--resource={CCP}")
    subject = f"--serviceaccount={NAMESPACE}:{AGENT_SA}"
    local_env.kubectl("create", "rolebinding", grant, "-n", "default", f"--role={grant}", subject)
    theirs, mine = unique("identity-new-b"), unique("identity-new-a")
    try:
        as_agent = f"--as=system:serviceaccount:{NAMESPACE}:{AGENT_SA}"
        # RBAC takes the new binding from its cache: until then a 403 would be RBAC's, not the policy's.
        until(
            "the Role granting create to take effect",
            lambda: (
                local_env.kubectl("auth", "can-i", "create", CCP, "-n", "default", as_agent, check=False).stdout.strip()
                == "yes"
            ),
            timeout=30,
        )
        message = refused(lambda: node_a.create(checkpoint_object(theirs, "node-b", "node-b")))
        assert message.endswith(f"containercheckpoints default/{theirs} is labelled {NODE_LABEL}=node-b"), message
        message = refused(lambda: node_a.create(checkpoint_object(theirs, "node-a")))
        assert message.endswith(f"containercheckpoints default/{theirs} has no {NODE_LABEL} label"), message
        node_a.create(checkpoint_object(mine, "node-a", "node-a"))
        # Left to run its course before it is deleted (it fails: its container does not exist).
        local_env.wait_phase("ccp", mine, ["Failed"], timeout=90)
        assert local_env.kubectl("get", CCP, theirs, "-n", "default", check=False).returncode != 0
    finally:
        local_env.kubectl("delete", "rolebinding,role", grant, "-n", "default", "--ignore-not-found")
        local_env.kubectl("delete", CCP, mine, "-n", "default", "--ignore-not-found", "--timeout=60s")


def test_the_label_alone_does_not_make_an_object_the_agents(local_env: LocalEnv, plane: ControlPlane) -> None:
    """Whoever may edit an object may label it: its spec.nodeName must name the agent's node as well."""
    name = unique("identity-elsewhere")
    # A node that does not exist: the controller fails it and never schedules it, so no label is put back.
    local_env.apply(checkpoint_object(name, "node-absent"))
    try:
        local_env.wait_phase("ccp", name, ["Failed"], timeout=90)
        local_env.kubectl("label", CCP, name, "-n", "default", f"{NODE_LABEL}=node-a")
        node_a = Agent(local_env.agent_kubeconfig("node-a"))
        assert refused(lambda: node_a.patch(name, {"status": {"startTime": "2020-01-01T00:00:00Z"}}, status=True)) == (
            "the checkpointer agent of node node-a may write only ContainerCheckpoints and ContainerRestores whose "
            f"spec.nodeName is node-a; containercheckpoints/status default/{name} has spec.nodeName node-absent"
        )
        message = refused(lambda: node_a.patch(name, {"metadata": {"annotations": {"test.checkpointer.dev/by": "a"}}}))
        assert message.endswith(f"containercheckpoints default/{name} has spec.nodeName node-absent"), message
        got = json.loads(local_env.kubectl("get", CCP, name, "-n", "default", "-o", "json").stdout)
        assert "startTime" not in got["status"], got["status"]
    finally:
        local_env.kubectl("delete", CCP, name, "-n", "default", "--ignore-not-found", "--timeout=60s")


def test_a_token_bound_to_no_pod_writes_nothing(
    local_env: LocalEnv, plane: ControlPlane, objects: dict[str, str]
) -> None:
    """The agent's ServiceAccount with a plain token (no Pod, so no node) is refused even node-a's objects."""
    plain = Agent(plane.kubeconfig_for_serviceaccount(NAMESPACE, AGENT_SA))
    mine = objects["node-a"]
    assert refused(lambda: plain.patch(mine, {"status": {"startTime": "2020-01-01T00:00:00Z"}}, status=True)) == (
        f"the checkpointer agent may write containercheckpoints/status default/{mine} only with a token that names "
        "its node (claim authentication.kubernetes.io/node-name, as in a token the kubelet projects into the "
        "agent Pod); this token names none"
    )
    renew = {"spec": {"holderIdentity": "node-a"}}
    message = refused(lambda: plain.leases.patch_namespaced_lease("checkpointer-agent-node-a", NAMESPACE, renew))
    assert message.startswith(f"the checkpointer agent may write leases {NAMESPACE}/checkpointer-agent-node-a "), (
        message
    )
    # The same account all the same: reading, which the policy leaves alone, works.
    assert (
        plain.custom.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, mine)["metadata"]["name"] == mine
    )


def _label(node: str | None) -> dict[str, Any]:
    return {"metadata": {"labels": {NODE_LABEL: node}}}


def _environ_of(env: LocalEnv, process: str) -> str:
    [proc] = [p for p in env.supervisor.processes if p.name == process and p.alive()]
    return Path(f"/proc/{proc.popen.pid}/environ").read_bytes().replace(b"\0", b"\n").decode()
