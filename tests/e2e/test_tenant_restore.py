"""The ContainerRestore fields that reach the node, as alice, an editor of team-a only (docs/security.md).

`publish` binds only host ports inside the environment's range (hack/localenv/env.py PUBLISH_HOST_PORTS),
`pod` joins only a pod of team-a, a named volume of the archive is used only when absent or team-a's,
and of two restores of one name on one node the loser removes nothing of the winner's. Both runtimes
answer the pod's and the volume's questions: node-a's REST API, node-b's CLI.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from typing import Any

import pytest

from helpers import exists, reason_and_message, unique
from invariants import check_invariants
from localenv.env import PUBLISH_HOST_PORTS, LocalEnv
from localenv.images import COUNTER, NAMESPACE_LABEL, owned_by, read_count
from tenants import NODE, TEAM_A, TEAM_B, Tenants

pytestmark = pytest.mark.e2e
NODES = ["node-a", "node-b"]  # the REST API and the CLI


def checkpoint_of_team_a(t: Tenants, *run_flags: str) -> tuple[str, str]:
    """A team-a counter run on NODE with `run_flags`, checkpointed by alice into the bucket and removed:
    (the container's name, the ContainerCheckpoint)."""
    env = t.env
    container = unique("counter")
    env.nodes[NODE].podman("run", "-d", *owned_by(TEAM_A), *run_flags, "--name", container, COUNTER)
    read_count(env.nodes[NODE], container)
    name = t.create("ContainerCheckpoint", TEAM_A, {"containers": [container], "export": {}})
    obj = t.finished("ccp", TEAM_A, name)
    assert obj["status"]["phase"] == "Succeeded", obj["status"]
    env.nodes[NODE].podman("rm", "-f", "-t", "0", container)
    return container, name


@pytest.fixture(scope="module")
def archived(tenants: Tenants) -> Iterator[str]:
    """One checkpoint of a team-a counter, restored by several tests under names of their own."""
    _, name = checkpoint_of_team_a(tenants)
    yield name
    tenants.delete("ccp", name)


def restore_as_alice(t: Tenants, checkpoint: str, node: str = NODE, **spec: Any) -> str:
    return t.create("ContainerRestore", TEAM_A, {"source": {"checkpointRef": {"name": checkpoint}}, **spec}, node=node)


def test_publish_only_host_ports_the_administrator_allows(tenants: Tenants, archived: str) -> None:
    t, env = tenants, tenants.env
    first, last = (int(p) for p in PUBLISH_HOST_PORTS.split("-"))
    # Refused by the controller: never scheduled onto the node.
    made = []
    for entry in ("0.0.0.0:22:8080", "8080"):
        refused = restore_as_alice(t, archived, name=unique("published"), publish=[entry])
        made.append(refused)
        obj = t.finished("crst", TEAM_A, refused)
        reason, message = reason_and_message(obj)
        assert (obj["status"]["phase"], reason) == ("Failed", "PublishNotPermitted"), obj["status"]
        assert repr(entry) in message and PUBLISH_HOST_PORTS in message and "tenancy.publishHostPorts" in message
        assert "nodeName" not in obj["status"], "the controller refused it before any node"

    port = first + int(unique("p").split("-")[1], 16) % (last - first + 1)
    name = unique("published")
    admitted = restore_as_alice(t, archived, name=name, publish=[f"127.0.0.1:{port}:8080/tcp"])
    obj = t.finished("crst", TEAM_A, admitted)
    assert obj["status"]["phase"] == "Succeeded", obj["status"]
    # A restored container shows its mappings there (its HostConfig keeps the archive's, none).
    out = env.nodes[NODE].podman("inspect", "--format", "{{json .NetworkSettings.Ports}}", name).stdout
    bindings = json.loads(out)
    assert bindings == {"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(port)}]}, bindings
    read_count(env.nodes[NODE], name)
    env.nodes[NODE].podman("rm", "-f", "-t", "0", name)
    for done in (*made, admitted):
        t.delete("crst", done)
    check_invariants(env)


@pytest.mark.parametrize("node", NODES)
def test_a_restore_joins_only_a_pod_of_its_namespace(tenants: Tenants, archived: str, node: str) -> None:
    t, env = tenants, tenants.env
    theirs, missing_pod = unique("pod"), unique("pod")
    # No infra container: what is judged is the pod's label, and its namespaces are none of the test's.
    env.nodes[node].podman("pod", "create", "--infra=false", *owned_by(TEAM_B), "--name", theirs)
    try:
        name = unique("podded")
        refused = restore_as_alice(t, archived, node, name=name, pod=theirs)
        obj = t.finished("crst", TEAM_A, refused)
        reason, message = reason_and_message(obj)
        assert (obj["status"]["phase"], reason) == ("Failed", "PodNotPermitted"), obj["status"]
        assert f"{NAMESPACE_LABEL}={TEAM_A}" in message and TEAM_B not in message
        assert not exists(env, node, name)
        members = env.nodes[node].podman("pod", "inspect", "--format", "{{.NumContainers}}", theirs).stdout
        assert members.decode().strip() == "0", "team-b's pod got no container"

        missing = restore_as_alice(t, archived, node, name=name, pod=missing_pod)
        obj = t.finished("crst", TEAM_A, missing)
        assert reason_and_message(obj)[0] == "PodNotFound", obj["status"]
        for done in (refused, missing):
            t.delete("crst", done)
    finally:
        env.nodes[node].podman("pod", "rm", "-f", theirs, check=False)
    check_invariants(env)


def volume_data(env: LocalEnv, node: str, volume: str) -> bytes:
    """The file `secret` in the volume, read by a container of its own."""
    out = env.nodes[node].podman("run", "--rm", "-v", f"{volume}:/data", COUNTER, "cat", "/data/secret")
    return bytes(out.stdout)


@pytest.mark.parametrize("node", NODES)
def test_another_namespaces_volume_is_refused_even_with_ignore_volumes(tenants: Tenants, node: str) -> None:
    t, env = tenants, tenants.env
    volume = unique("data")
    # A team-a container that used the named volume; its archive lists the volume in config.dump.
    _, checkpoint = checkpoint_of_team_a(t, "-v", f"{volume}:/data")
    env.nodes[NODE].podman("volume", "rm", volume)
    # On the target node, team-b holds a volume of that name, with its data.
    secret = b"team-b's data\n"
    content = io.BytesIO()
    with tarfile.open(fileobj=content, mode="w") as tar:
        info = tarfile.TarInfo("secret")
        info.size = len(secret)
        tar.addfile(info, io.BytesIO(secret))
    target = env.nodes[node]
    target.podman("volume", "create", *owned_by(TEAM_B), volume)
    target.podman("volume", "import", volume, "-", input=content.getvalue())
    try:
        name = unique("mounted")
        for ignore in (True, False):
            refused = restore_as_alice(t, checkpoint, node, name=name, ignoreVolumes=ignore)
            obj = t.finished("crst", TEAM_A, refused)
            reason, message = reason_and_message(obj)
            assert (obj["status"]["phase"], reason) == ("Failed", "VolumeNotPermitted"), obj["status"]
            assert repr(volume) in message and f"{NAMESPACE_LABEL}={TEAM_A}" in message
            assert "nothing was restored" in message
            assert not exists(env, node, name)
            t.delete("crst", refused)
        assert volume_data(env, node, volume) == secret, "team-b's volume is untouched"

        # team-a's own volume is used with ignoreVolumes; without the volume podman creates it from the archive.
        target.podman("volume", "rm", volume)
        target.podman("volume", "create", *owned_by(TEAM_A), volume)
        for ignore in (True, False):
            admitted = restore_as_alice(t, checkpoint, node, name=name, ignoreVolumes=ignore)
            obj = t.finished("crst", TEAM_A, admitted)
            assert obj["status"]["phase"] == "Succeeded", obj["status"]
            read_count(target, name)
            target.podman("rm", "-f", "-t", "0", name)
            target.podman("volume", "rm", volume)
            t.delete("crst", admitted)
    finally:
        target.podman("volume", "rm", "-f", volume, check=False)
    t.delete("ccp", checkpoint)
    check_invariants(env)


def test_the_loser_of_two_restores_of_one_name_removes_nothing(tenants: Tenants, archived: str) -> None:
    t, env = tenants, tenants.env
    name = unique("raced")
    both = [restore_as_alice(t, archived, name=name), restore_as_alice(t, archived, name=name)]
    finished = {r: t.finished("crst", TEAM_A, r) for r in both}
    phases = sorted(obj["status"]["phase"] for obj in finished.values())
    assert phases == ["Failed", "Succeeded"], [obj["status"] for obj in finished.values()]
    [winner] = [obj for obj in finished.values() if obj["status"]["phase"] == "Succeeded"]
    [loser] = [obj for obj in finished.values() if obj["status"]["phase"] == "Failed"]
    assert reason_and_message(loser)[0] == "NameInUse", loser["status"]
    node = env.nodes[NODE]
    inspected = node.podman("inspect", "--format", "{{.Id}} {{.State.Status}}", name).stdout.decode().split()
    assert inspected == [winner["status"]["containerID"], "running"], inspected
    read_count(node, name)
    node.podman("rm", "-f", "-t", "0", name)
    for done in both:
        t.delete("crst", done)
    check_invariants(env)


def test_the_archives_network_is_joined_only_when_labelled_for_the_namespace(tenants: Tenants) -> None:
    """A network of one name may be team-a's on NODE and team-b's on node-a: the restore does not join it."""
    t, env = tenants, tenants.env
    network, target = unique("shared"), env.nodes["node-a"]
    env.nodes[NODE].podman("network", "create", *owned_by(TEAM_A), network)
    try:
        _, checkpoint = checkpoint_of_team_a(t, "--network", network)
        target.podman("network", "create", *owned_by(TEAM_B), network)
        name = unique("joined")
        refused = restore_as_alice(t, checkpoint, "node-a", name=name)
        obj = t.finished("crst", TEAM_A, refused)
        reason, message = reason_and_message(obj)
        assert (obj["status"]["phase"], reason) == ("Failed", "NetworkNotPermitted"), obj["status"]
        assert repr(network) in message and f"{NAMESPACE_LABEL}={TEAM_A}" in message and TEAM_B not in message
        assert not exists(env, "node-a", name)

        # The same network labelled for team-a on node-a: joined, and the count goes on there.
        target.podman("network", "rm", network)
        target.podman("network", "create", *owned_by(TEAM_A), network)
        admitted = restore_as_alice(t, checkpoint, "node-a", name=name)
        obj = t.finished("crst", TEAM_A, admitted)
        assert obj["status"]["phase"] == "Succeeded", obj["status"]
        read_count(target, name)
        target.podman("rm", "-f", "-t", "0", name)
        for done in (refused, admitted):
            t.delete("crst", done)
        t.delete("ccp", checkpoint)
    finally:
        for node in (env.nodes[NODE], target):
            node.podman("network", "rm", "-f", network, check=False)
    check_invariants(env)
