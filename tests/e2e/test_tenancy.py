"""Tenancy end to end, as a user who can edit only namespace team-a through the chart's aggregated roles.

Real API server (RBAC, the controller-manager's role aggregation), real podman nodes, real S3. The
user is a client certificate with the built-in `edit` ClusterRole bound in team-a; what team-b owns
is made with the admin's credentials, as team-b's own users would.
"""

from __future__ import annotations

import json
import time

import pytest

from helpers import extra_storage, reason_and_message, remove, unique
from invariants import check_invariants
from localenv.images import read_count
from tenants import NODE, TEAM_A, TEAM_B, Tenants, labelled_counter

pytestmark = pytest.mark.e2e


def test_a_namespace_checkpoints_only_its_own_containers_into_its_own_folder(tenants: Tenants) -> None:
    t, env = tenants, tenants.env
    count_before = read_count(env.nodes[NODE], t.theirs)

    # Named: refused before podman sees it, and the message names the label that would permit it.
    name = t.create("ContainerCheckpoint", TEAM_A, {"containers": [t.theirs], "export": {}})
    obj = t.finished("ccp", TEAM_A, name)
    reason, message = reason_and_message(obj)
    assert (obj["status"]["phase"], reason) == ("Failed", "ContainerNotPermitted"), obj["status"]
    assert f"checkpointer.dev/namespace={TEAM_A}" in message
    assert TEAM_B not in message, "the message tells nothing of whose the container is"
    assert t.state(t.theirs) == "running"
    time.sleep(1.5)
    assert read_count(env.nodes[NODE], t.theirs) > count_before, "team-b's counter kept counting"

    # all: only team-a's containers, and a key aimed at team-b's folder is a folder inside team-a's.
    everything = t.create(
        "ContainerCheckpoint", TEAM_A, {"all": True, "leaveRunning": True, "export": {"key": f"{TEAM_B}/x"}}
    )
    obj = t.finished("ccp", TEAM_A, everything)
    assert obj["status"]["phase"] == "Succeeded", obj["status"]
    [archive] = obj["status"]["archives"]
    assert archive["container"] == t.ours
    folder = f"x-{obj['metadata']['uid'][:8]}"
    assert archive["key"] == f"{TEAM_A}/{TEAM_B}/{folder}/{t.ours}.tar.zst"
    assert t.stored(archive["key"]) and t.stored(f"{TEAM_A}/{TEAM_B}/{folder}/manifest.json")
    assert not t.stored(f"{TEAM_B}/{folder}/{t.ours}.tar.zst") and not t.stored(f"{TEAM_B}/{folder}/manifest.json")
    assert t.state(t.theirs) == "running"

    # latest: team-b's container is the newest on the node, yet team-a's latest is its own.
    newest = t.create("ContainerCheckpoint", TEAM_A, {"latest": True, "leaveRunning": True})
    obj = t.finished("ccp", TEAM_A, newest)
    assert obj["status"]["phase"] == "Succeeded", obj["status"]
    assert [a["container"] for a in obj["status"]["archives"]] == [t.ours]
    for done in (name, everything, newest):
        t.delete("ccp", done)
    check_invariants(env)


def test_latest_through_the_rest_api_is_the_namespaces_newest(tenants: Tenants) -> None:
    """node-a's agent lists containers through podman's REST API, whose creation times are RFC 3339."""
    t, env, node = tenants, tenants.env, "node-a"
    ours, theirs = labelled_counter(env, TEAM_A, node), labelled_counter(env, TEAM_B, node)
    try:
        name = t.create("ContainerCheckpoint", TEAM_A, {"latest": True, "leaveRunning": True}, node=node)
        obj = t.finished("ccp", TEAM_A, name)
        assert obj["status"]["phase"] == "Succeeded", obj["status"]
        assert [a["container"] for a in obj["status"]["archives"]] == [ours]
        t.delete("ccp", name)
    finally:
        remove(env, node, ours, theirs)


def test_team_a_cannot_restore_or_delete_team_bs_archives(tenants: Tenants) -> None:
    t, env = tenants, tenants.env
    # team-b's own checkpoint of its container, into team-b's folder.
    made = t.create("ContainerCheckpoint", TEAM_B, {"containers": [t.theirs], "export": {}}, as_alice=False)
    obj = t.finished("ccp", TEAM_B, made)
    assert obj["status"]["phase"] == "Succeeded", obj["status"]
    [theirs] = obj["status"]["archives"]
    assert theirs["key"].startswith(f"{TEAM_B}/{made}-")
    inside = theirs["key"].removeprefix(f"{TEAM_B}/")
    restored = unique("stolen")

    # Naming team-b's folder is for admin namespaces only; the same key alone is a key in team-a's folder.
    asked = t.create(
        "ContainerRestore",
        TEAM_A,
        {"source": {"archive": {"key": inside, "namespace": TEAM_B}}, "name": restored},
    )
    obj = t.finished("crst", TEAM_A, asked)
    assert reason_and_message(obj)[0] == "ArchiveNotPermitted", obj["status"]
    for key in (inside, theirs["key"]):
        asked = t.create("ContainerRestore", TEAM_A, {"source": {"archive": {"key": key}}, "name": restored})
        obj = t.finished("crst", TEAM_A, asked)
        assert reason_and_message(obj)[0] == "ArchiveNotFound", obj["status"]
        assert obj["status"]["archive"]["key"] == f"{TEAM_A}/{key}"
    assert env.nodes[NODE].podman("container", "exists", restored, check=False).returncode == 1

    # Two team-a checkpoints given one export.key: each gets a folder of its own, and each deletion
    # takes only its own objects, none of the other's, none of team-b's.
    shared = {"export": {"key": "shared"}}
    # The second stops the container and keeps its local checkpoint, to bring it back by hand.
    keys, uids = {}, {}
    for spec in ({"leaveRunning": True}, {"compress": "none", "keep": True}):
        name = t.create("ContainerCheckpoint", TEAM_A, {"containers": [t.ours], **spec, **shared})
        obj = t.finished("ccp", TEAM_A, name)
        assert obj["status"]["phase"] == "Succeeded", obj["status"]
        keys[name], uids[name] = obj["status"]["archives"][0]["key"], obj["metadata"]["uid"]
    zstd, plain = keys
    assert keys == {
        zstd: f"{TEAM_A}/shared-{uids[zstd][:8]}/{t.ours}.tar.zst",
        plain: f"{TEAM_A}/shared-{uids[plain][:8]}/{t.ours}.tar",
    }
    assert t.state(t.ours) == "exited"
    env.nodes[NODE].podman("container", "restore", t.ours)
    t.delete("ccp", plain)
    assert not t.stored(keys[plain])
    assert t.stored(keys[zstd]) and t.stored(f"{keys[zstd].rsplit('/', 1)[0]}/manifest.json"), (
        "a checkpoint given the same key keeps its archive and manifest"
    )
    t.delete("ccp", zstd)
    assert not t.stored(keys[zstd])
    assert t.stored(theirs["key"]) and t.stored(f"{TEAM_B}/{inside.rsplit('/', 1)[0]}/manifest.json")
    for name in json.loads(env.kubectl("get", "crst", "-n", TEAM_A, "-o", "json").stdout)["items"]:
        t.delete("crst", name["metadata"]["name"])
    check_invariants(env, stopped=[(NODE, t.ours)])
    env.kubectl("delete", "ccp", made, "-n", TEAM_B, "--wait=true", "--timeout=60s")
    assert not t.stored(theirs["key"]), "team-b's own deletion does delete it"


def test_a_storage_serves_only_the_namespaces_it_allows(tenants: Tenants) -> None:
    t, env = tenants, tenants.env
    # Not default: the environment keeps exactly one default storage. The default's prefix: one inside
    # it would nest with it, and be Unavailable.
    with extra_storage(env, allowedNamespaces=[TEAM_B]) as storage:
        ref = {"storageRef": {"name": storage}}
        name = t.create("ContainerCheckpoint", TEAM_A, {"containers": [t.ours], "export": ref})
        obj = t.finished("ccp", TEAM_A, name)
        reason, message = reason_and_message(obj)
        assert (obj["status"]["phase"], reason) == ("Failed", "StorageNotPermitted"), obj["status"]
        assert storage in message and TEAM_A in message
        assert t.state(t.ours) == "running"
        asked = t.create("ContainerRestore", TEAM_A, {"source": {"archive": {**ref, "key": "x/web.tar.zst"}}})
        assert reason_and_message(t.finished("crst", TEAM_A, asked))[0] == "StorageNotPermitted"
        t.delete("ccp", name)
        t.delete("crst", asked)
        check_invariants(env)


def test_a_namespace_migrates_only_its_own_containers(tenants: Tenants) -> None:
    """A ContainerMigration is judged as the checkpoint it makes: another namespace's container is
    refused untouched, and the namespace's editors may migrate in their namespace only."""
    t, env = tenants, tenants.env
    cp = env.control_plane
    # A counter of team-b's own: the session's may have been stopped by a test before.
    theirs = labelled_counter(env, TEAM_B)
    try:
        count_before = read_count(env.nodes[NODE], theirs)
        name = unique("cmig")
        migration = {
            "apiVersion": "checkpointer.dev/v1alpha1",
            "kind": "ContainerMigration",
            "metadata": {"name": name, "namespace": TEAM_A},
            "spec": {"source": {"nodeName": NODE, "container": theirs}},
        }
        cp.kubectl("create", "-f", "-", kubeconfig=t.alice, input=json.dumps(migration))
        obj = env.wait_phase("cmig", name, ["Succeeded", "Failed"], namespace=TEAM_A)
        reason, message = reason_and_message(obj)
        assert (obj["status"]["phase"], reason) == ("Failed", "ContainerNotPermitted"), obj["status"]
        assert f"checkpointer.dev/namespace={TEAM_A}" in message and "nothing was restored" in message
        # The restore that followed the refused checkpoint failed with it; none went back to the source.
        assert "fallbackRestoreRef" not in obj["status"]
        assert t.state(theirs) == "running"
        time.sleep(1.5)
        assert read_count(env.nodes[NODE], theirs) > count_before, "team-b's counter kept counting"

        def can(verb: str, namespace: str, *extra: str) -> bool:
            resource = "containermigrations.checkpointer.dev"
            out = cp.kubectl("auth", "can-i", verb, resource, "-n", namespace, *extra, kubeconfig=t.alice, check=False)
            return bool(out.stdout.strip() == "yes")

        assert can("create", TEAM_A) and can("delete", TEAM_A)
        assert not can("create", TEAM_B) and not can("patch", TEAM_A, "--subresource=status")
        cp.kubectl("delete", "cmig", name, "-n", TEAM_A, "--wait=true", "--timeout=60s", kubeconfig=t.alice)
    finally:
        remove(env, NODE, theirs)
