"""ContainerRestore end to end: migrate a counter from node-a to node-b through S3, and every failure."""

from __future__ import annotations

import hashlib
import time

import pytest

from helpers import (
    apply,
    checkpoint_counter,
    reason_of,
    remove,
    restore,
    restores_of,
    state,
    storage_accepting_unsigned,
    unique,
    until,
)
from localenv.env import LocalEnv
from localenv.images import COUNTER, MEMORY, owned_by, read_count, wait_for_log


def relative(key: str) -> str:
    """A stored key as a restore names it: relative to its namespace's folder (the storage has no prefix)."""
    assert key.startswith("default/"), key
    return key.removeprefix("default/")


@pytest.mark.parametrize("target", ["node-b", "node-a"])
def test_migrate_by_checkpoint_ref_continues_the_count(local_env: LocalEnv, target: str) -> None:
    container, name, counted, _ = checkpoint_counter(local_env)
    obj = restore(local_env, target, {"checkpointRef": {"name": name}})
    status = obj["status"]
    assert status["phase"] == "Succeeded", status
    assert status["containerName"] == container
    node = local_env.nodes[target]
    assert node.podman("inspect", "--format", "{{.Id}}", container).stdout.decode().strip() == status["containerID"]
    time.sleep(1)
    assert read_count(node, container) > counted
    node.podman("rm", "-f", container)


def test_migrate_from_storage_and_key_alone(local_env: LocalEnv) -> None:
    """As if the cluster that made it were gone: only the storage, the key and the manifest beside it."""
    container, _, counted, archive = checkpoint_counter(local_env)
    obj = restore(
        local_env,
        "node-b",
        {"archive": {"storageRef": {"name": "local"}, "key": relative(archive["key"])}},
        name=f"{container}-moved",
    )
    assert obj["status"]["phase"] == "Succeeded", obj["status"]
    assert obj["status"]["archive"]["key"] == archive["key"], "status holds the key the restore resolved"
    time.sleep(1)
    assert read_count(local_env.nodes["node-b"], f"{container}-moved") > counted
    local_env.nodes["node-b"].podman("rm", "-f", f"{container}-moved")


def test_wrong_sha256_is_archive_corrupt(local_env: LocalEnv) -> None:
    container, _, _, archive = checkpoint_counter(local_env)
    obj = restore(local_env, "node-b", {"archive": {"key": relative(archive["key"]), "sha256": "0" * 64}})
    assert reason_of(obj) == "ArchiveCorrupt"
    assert local_env.nodes["node-b"].podman("container", "exists", container, check=False).returncode == 1


def test_corrupt_archive_is_archive_corrupt_and_nothing_is_restored(local_env: LocalEnv) -> None:
    container, _, _, archive = checkpoint_counter(local_env)
    s3 = local_env.s3.client()
    data = bytearray(s3.get_object(Bucket=local_env.s3.bucket, Key=archive["key"])["Body"].read())
    data[len(data) // 2 : len(data) // 2 + 4096] = bytes(4096)
    key = archive["key"].replace(".tar.zst", "-damaged.tar.zst")
    s3.put_object(Bucket=local_env.s3.bucket, Key=key, Body=bytes(data))
    source = {"key": relative(key), "sha256": hashlib.sha256(data).hexdigest()}
    # No signed manifest lists the damaged copy: only a storage that admits unsigned archives reads it.
    with storage_accepting_unsigned(local_env) as storage:
        obj = restore(local_env, "node-b", {"archive": {**source, "storageRef": {"name": storage}}})
    s3.delete_object(Bucket=local_env.s3.bucket, Key=key)
    assert reason_of(obj) == "ArchiveCorrupt", obj["status"]
    assert local_env.nodes["node-b"].podman("container", "exists", container, check=False).returncode == 1


def test_missing_object_is_archive_not_found(local_env: LocalEnv) -> None:
    obj = restore(local_env, "node-b", {"archive": {"key": "nothing-here/counter.tar.zst"}})
    assert reason_of(obj) == "ArchiveNotFound"


def test_taken_name_is_name_in_use(local_env: LocalEnv) -> None:
    container, name, _, _ = checkpoint_counter(local_env)
    local_env.nodes["node-b"].podman("run", "-d", *owned_by("default"), "--name", container, COUNTER)
    obj = restore(local_env, "node-b", {"checkpointRef": {"name": name}})
    assert reason_of(obj) == "NameInUse"
    local_env.nodes["node-b"].podman("rm", "-f", container)


def test_missing_image_is_image_not_found(local_env: LocalEnv) -> None:
    container, name, _, _ = checkpoint_counter(local_env)
    node = local_env.nodes["node-b"]
    node.podman("tag", COUNTER, "localhost/checkpointer/counter:keep")
    node.podman("rmi", COUNTER)
    try:
        obj = restore(local_env, "node-b", {"checkpointRef": {"name": name}})
        assert reason_of(obj) == "ImageNotFound", obj["status"]
        assert node.podman("container", "exists", container, check=False).returncode == 1
    finally:
        node.podman("tag", "localhost/checkpointer/counter:keep", COUNTER)
        node.podman("rmi", "localhost/checkpointer/counter:keep")


def test_checkpoint_ref_must_have_succeeded_and_been_exported(local_env: LocalEnv) -> None:
    obj = restore(local_env, "node-b", {"checkpointRef": {"name": "no-such-checkpoint"}})
    assert reason_of(obj) == "CheckpointNotFound"


def test_agent_killed_mid_download_restores_once(local_env: LocalEnv) -> None:
    """An agent killed while it downloads downloads again after its restart, and restores exactly once."""
    env = local_env
    source, target = env.nodes["node-a"], env.nodes["node-b"]
    container = unique("memory")
    source.podman("run", "-d", *owned_by("default"), "--name", container, MEMORY, "96")
    wait_for_log(source, container, "ready")
    name = unique("ccp")
    # Uncompressed, so that the archive is as big as the memory (about 100 MiB).
    apply(
        env,
        "ContainerCheckpoint",
        name,
        {"nodeName": source.name, "containers": [container], "export": {}, "compress": "none"},
    )
    status = env.wait_phase("ccp", name, ["Succeeded", "Failed"], timeout=300)["status"]
    assert status["phase"] == "Succeeded", status
    size = status["archives"][0]["size"]
    assert size > 96 * 1024 * 1024
    source.podman("rm", "-f", container)

    # A slow downlink (about 16 s for this archive) keeps the download running long enough to kill
    # the agent in the middle of it.
    env.stop_agent("node-b")
    env.start_agent("node-b", {"CHECKPOINTER_DOWNLOAD_BYTES_PER_SECOND": str(6 * 1024 * 1024)})
    restore_name = unique("crst")
    try:
        apply(
            env,
            "ContainerRestore",
            restore_name,
            {"nodeName": target.name, "source": {"checkpointRef": {"name": name}}},
        )
        deadline = time.monotonic() + 120
        while True:
            obj = env.wait_phase("crst", restore_name, ["Downloading", "Restoring", "Succeeded", "Failed"])
            assert obj["status"]["phase"] == "Downloading", obj["status"]
            # An eighth in (about 2 s): well inside the download, far from its end.
            if (obj["status"].get("progress") or {}).get("bytesDone", 0) >= size // 8:
                break
            assert time.monotonic() < deadline, f"the download did not reach an eighth: {obj['status']}"
            time.sleep(0.2)
        env.stop_agent("node-b", kill=True)
        progress = env.wait_phase("crst", restore_name, ["Downloading"])["status"]["progress"]
        assert size // 8 <= progress["bytesDone"] < progress["bytesTotal"] == size, progress
        uid = obj["metadata"]["uid"]
        workdir = target.spool_dir / "checkpointer" / f"restore_default_{restore_name}_{uid}"
        assert workdir.is_dir(), "the killed agent left its partial download"
        assert not (workdir / "restoring").exists(), "the agent was killed before it called podman"
    finally:
        env.stop_agent("node-b")
        env.start_agent("node-b", {})
    try:
        status = env.wait_phase("crst", restore_name, ["Succeeded", "Failed"], timeout=300)["status"]
        assert status["phase"] == "Succeeded", status
        assert status["progress"]["bytesDone"] == size
        # The folder goes right after the final status write, which it outlives on purpose (its marker
        # is what stops a retry from restoring twice).
        until("the download and its leftovers are cleaned up", lambda: not workdir.exists(), timeout=10)
        # Restored once: one container of that name, and podman restored it once.
        ids = target.podman("ps", "--all", "--filter", f"name=^{container}$", "--format", "{{.ID}}")
        assert len(ids.stdout.decode().split()) == 1
        assert restores_of(env, "node-b", container) == 1
        assert state(env, "node-b", container) == "running"
    finally:
        remove(env, "node-b", container)
