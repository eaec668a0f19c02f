"""An archive's keys belong to one checkpoint, for its whole life (docs/api.md, docs/failure-semantics.md).

As alice, who may edit only team-a: two checkpoints given the same export.key each restore their own
bytes, and deleting one leaves the other's archive and manifest; a schedule whose template sets
export.key keeps every run it retains restorable; a storage whose prefix nests with an older one's
on the same bucket is Unavailable, naming the older.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from helpers import reason_and_message, remove, unique, until
from invariants import check_invariants
from localenv.env import STORAGE
from localenv.images import read_count
from tenants import NODE, TEAM_A, Tenants, labelled_counter

pytestmark = pytest.mark.e2e

SCHEDULE_LABEL = "checkpointer.dev/schedule"


def restored_count(t: Tenants, checkpoint: str) -> tuple[str, int]:
    """Restore `checkpoint` on NODE as a new container, as alice; its name and the count it goes on from."""
    container = unique("restored")
    name = t.create("ContainerRestore", TEAM_A, {"source": {"checkpointRef": {"name": checkpoint}}, "name": container})
    obj = t.finished("crst", TEAM_A, name)
    assert obj["status"]["phase"] == "Succeeded", obj["status"]
    return container, read_count(t.env.nodes[NODE], container)


def folder_of(obj: dict[str, Any]) -> str:
    return str(obj["status"]["archives"][0]["key"]).rsplit("/", 1)[0]


def delete_restores(t: Tenants) -> None:
    for item in json.loads(t.env.kubectl("get", "crst", "-n", TEAM_A, "-o", "json").stdout)["items"]:
        t.delete("crst", item["metadata"]["name"])


def test_two_checkpoints_given_one_key_each_restore_their_own_bytes(tenants: Tenants) -> None:
    t, env = tenants, tenants.env
    node = env.nodes[NODE]
    counter = labelled_counter(env, TEAM_A)
    key = {"export": {"key": unique("same")}}
    made: list[str] = []
    try:
        # The first leaves the counter running, zstd; the second stops it, uncompressed, later on.
        first = t.create("ContainerCheckpoint", TEAM_A, {"containers": [counter], "leaveRunning": True, **key})
        first_obj = t.finished("ccp", TEAM_A, first)
        assert first_obj["status"]["phase"] == "Succeeded", first_obj["status"]
        after_first = read_count(node, counter)
        # Apart by far more than the counter runs on while a restore is written and read (5 a second).
        until("the counter to count on", lambda: read_count(node, counter) > after_first + 40, timeout=60)
        before_second = read_count(node, counter)
        second = t.create("ContainerCheckpoint", TEAM_A, {"containers": [counter], "compress": "none", **key})
        second_obj = t.finished("ccp", TEAM_A, second)
        assert second_obj["status"]["phase"] == "Succeeded", second_obj["status"]
        assert t.state(counter) == "exited"

        folders = {folder_of(first_obj), folder_of(second_obj)}
        uids = (first_obj["metadata"]["uid"][:8], second_obj["metadata"]["uid"][:8])
        assert folders == {f"{TEAM_A}/{key['export']['key']}-{uid}" for uid in uids}, folders
        keys = [str(o["status"]["archives"][0]["key"]) for o in (first_obj, second_obj)]
        assert keys[0].endswith(".tar.zst") and keys[1].endswith(".tar")

        # Each restores its own memory: the first the count before it, the second the one it stopped at.
        restored, count = restored_count(t, first)
        made.append(restored)
        assert count < before_second, f"the first checkpoint restored count {count}, taken after {before_second}"
        # Deleting the first takes its archive and manifest, and nothing of the second's.
        t.delete("ccp", first)
        assert not t.stored(keys[0]) and not t.stored(f"{folder_of(first_obj)}/manifest.json")
        assert t.stored(keys[1]) and t.stored(f"{folder_of(second_obj)}/manifest.json")
        restored, count = restored_count(t, second)
        made.append(restored)
        assert count >= before_second, f"the second checkpoint restored count {count}, taken after {before_second}"
        t.delete("ccp", second)
        assert not t.stored(keys[1])
        remove(t.env, NODE, counter)  # stopped by the second, whose archive is deleted now: nothing to keep it for
        delete_restores(t)
        check_invariants(env)
    finally:
        remove(t.env, NODE, counter, *made)


def test_a_schedule_with_export_key_keeps_every_run_it_retains_restorable(tenants: Tenants) -> None:
    t, env = tenants, tenants.env
    counter = labelled_counter(env, TEAM_A)
    name = unique("every3")
    made: list[str] = []
    template = {
        "nodeName": NODE,
        "containers": [counter],
        "leaveRunning": True,
        "export": {"key": "nightly"},
    }
    schedule = {
        "apiVersion": "checkpointer.dev/v1alpha1",
        "kind": "CheckpointSchedule",
        "metadata": {"name": name, "namespace": TEAM_A},
        "spec": {"schedule": "*/3 * * * * *", "retention": {"keepLast": 2}, "template": template},
    }

    def children() -> list[dict[str, Any]]:
        found = env.list_objects("ccp", TEAM_A, label_selector=f"{SCHEDULE_LABEL}={name}")
        return sorted(found, key=lambda o: o["metadata"]["name"])

    def three_runs() -> bool:
        selector = f"involvedObject.kind=CheckpointSchedule,involvedObject.name={name}"
        created = [e for e in env.list_objects("events", TEAM_A, selector) if e.get("reason") == "Created"]
        return len(created) >= 3

    env.control_plane.kubectl("create", "-f", "-", kubeconfig=t.alice, input=json.dumps(schedule))
    try:
        until("three runs", three_runs, timeout=90)
        env.control_plane.kubectl(
            "patch", "ccs", name, "-n", TEAM_A, "--type=merge", "-p", '{"spec":{"suspend":true}}', kubeconfig=t.alice
        )

        def kept() -> list[dict[str, Any]] | None:
            found = children()
            done = all((c.get("status") or {}).get("phase") in ("Succeeded", "Failed") for c in found)
            return found if done and len(found) == 2 else None

        runs = until("retention down to keepLast", kept, timeout=90)
        assert [r["status"]["phase"] for r in runs] == ["Succeeded", "Succeeded"], [r["status"] for r in runs]
        assert len({folder_of(r) for r in runs}) == 2, "every run has a folder of its own"
        for run in runs:
            assert folder_of(run) == f"{TEAM_A}/nightly-{run['metadata']['uid'][:8]}"
            # What retention deleted before took nothing of the runs it keeps.
            restored, count = restored_count(t, run["metadata"]["name"])
            made.append(restored)
            assert count > 0
        env.control_plane.kubectl("delete", "ccs", name, "-n", TEAM_A, "--wait=true", kubeconfig=t.alice)
        until("the runs gone with their schedule", lambda: not children(), timeout=60)
        delete_restores(t)
        check_invariants(env)
    finally:
        env.kubectl("delete", "ccs", name, "-n", TEAM_A, "--ignore-not-found", "--wait=false")
        remove(t.env, NODE, counter, *made)


def test_a_storage_nesting_with_an_older_ones_prefix_is_unavailable_naming_it(tenants: Tenants) -> None:
    t, env = tenants, tenants.env
    local = json.loads(env.kubectl("get", "cks", STORAGE, "-o", "json").stdout)["spec"]
    name = unique("nested")
    # Inside the environment's storage's prefix (the whole bucket), as team-a's folder of it.
    spec = {**local, "default": False, "prefix": f"{local.get('prefix') or ''}/{TEAM_A}".strip("/")}
    env.apply(
        {
            "apiVersion": "checkpointer.dev/v1alpha1",
            "kind": "CheckpointStorage",
            "metadata": {"name": name},
            "spec": spec,
        }
    )
    try:

        def status() -> dict[str, Any]:
            return dict((env.read("cks", name) or {}).get("status") or {})

        found = until(
            "the nested storage Unavailable", lambda: (s := status()).get("phase") == "Unavailable" and s, timeout=60
        )
        assert STORAGE in found["message"] and "nests" in found["message"], found
        assert env.kubectl("get", "cks", STORAGE, "-o", "jsonpath={.status.phase}").stdout == "Available"
        # Nothing is written through it.
        ccp = t.create(
            "ContainerCheckpoint", TEAM_A, {"containers": [t.ours], "export": {"storageRef": {"name": name}}}
        )
        obj = t.finished("ccp", TEAM_A, ccp)
        reason, message = reason_and_message(obj)
        assert (obj["status"]["phase"], reason) == ("Failed", "StorageUnavailable"), obj["status"]
        assert STORAGE in message
        assert t.state(t.ours) == "running"
        t.delete("ccp", ccp)
    finally:
        env.kubectl("delete", "cks", name, "--wait=true")
    check_invariants(env)
