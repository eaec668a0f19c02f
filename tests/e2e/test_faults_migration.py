"""Faults during a ContainerMigration, injected for real: either agent SIGKILLed (while podman
checkpoints, mid-upload, mid-download, mid-stream, while podman imports), S3 stopped mid-transfer,
and a restore on the target that fails for good. Whatever happens after the source container
stopped, it ends running again on exactly one node: on the target when the restore can still
succeed, else on the source (docs/failure-semantics.md). Each test ends with the invariant check."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from helpers import (
    MiB,
    assert_runs_on_exactly_one_node,
    exists,
    finished,
    get,
    migration,
    ready,
    reason_and_message,
    remove,
    unique,
    uploading,
    wait_for,
    workload,
)
from invariants import check_invariants, spool_dirs
from localenv import faults
from localenv.env import LocalEnv
from localenv.images import COUNTER, owned_by, read_count

pytestmark = pytest.mark.e2e
SOURCE, TARGET = "node-a", "node-b"
# Slow links on both sides, so that the upload and the download each last a few seconds and a fault
# falls inside them: 48 MiB uncompressed at 6 MiB/s.
SLOW_UP = {
    "CHECKPOINTER_UPLOAD_BYTES_PER_SECOND": str(6 * MiB),
    "CHECKPOINTER_UPLOAD_RETRY_SECONDS": "2",
    "CHECKPOINTER_UPLOAD_RETRY_MAX_SECONDS": "4",
}
SLOW_DOWN = {"CHECKPOINTER_DOWNLOAD_BYTES_PER_SECOND": str(6 * MiB)}


def downloading(obj: dict[str, Any], at_least: int) -> bool:
    status = obj.get("status") or {}
    done = int((status.get("progress") or {}).get("bytesDone") or 0)
    return status.get("phase") == "Downloading" and done >= at_least


def published(obj: dict[str, Any]) -> int:
    """How many parts the checkpoint's first archive published in status.streams."""
    streams = (obj.get("status") or {}).get("streams") or [{}]
    return len(streams[0].get("digests") or [])


def children(env: LocalEnv, name: str) -> tuple[str, str]:
    """The names of the migration's checkpoint and restore, once it made them."""
    obj = wait_for(env, "cmig", name, "its restore", lambda o: bool((o.get("status") or {}).get("restoreRef")))
    return obj["status"]["checkpointRef"]["name"], obj["status"]["restoreRef"]["name"]


def test_agents_killed_mid_upload_and_mid_download_the_container_runs_on_the_target(local_env: LocalEnv) -> None:
    env = local_env
    container = workload(env, SOURCE)
    try:
        with faults.agent_settings(env, SOURCE, SLOW_UP), faults.agent_settings(env, TARGET, SLOW_DOWN):
            name = migration(env, SOURCE, container, targetNodeName=TARGET, compress="none")
            # The restore follows the checkpoint: both transfers run at once, so the target's agent
            # is killed mid-download first, then the source's mid-upload, while the upload still runs.
            wait_for(env, "ccp", name, "upload under way", lambda o: uploading(o, 8 * MiB))
            _, restore = children(env, name)
            wait_for(env, "crst", restore, "download under way", lambda o: downloading(o, 0))
            faults.restart_agent(env, TARGET, SLOW_DOWN, kill=True)  # follows the checkpoint again
            assert get(env, "ccp", name)["status"]["phase"] == "Uploading"  # type: ignore[index]
            faults.restart_agent(env, SOURCE, SLOW_UP, kill=True)  # resumes the upload from its spool
            obj = wait_for(env, "cmig", name, "an end", finished, timeout=180)
            assert obj["status"]["phase"] == "Succeeded", obj["status"]
            assert obj["status"]["downtimeSeconds"] > 0
        assert_runs_on_exactly_one_node(env, container, TARGET)
        check_invariants(env)
    finally:
        remove(env, SOURCE, container)
        remove(env, TARGET, container)


def test_s3_stopped_mid_upload_and_mid_download_the_migration_waits_and_succeeds(local_env: LocalEnv) -> None:
    env = local_env
    container = workload(env, SOURCE)
    try:
        with faults.agent_settings(env, SOURCE, SLOW_UP), faults.agent_settings(env, TARGET, SLOW_DOWN):
            name = migration(env, SOURCE, container, targetNodeName=TARGET, compress="none")
            wait_for(env, "ccp", name, "upload under way", lambda o: uploading(o, 8 * MiB))
            # The restore follows the checkpoint, so both transfers run at once: the outages cut both.
            with faults.s3_down(env):
                time.sleep(4)
                assert get(env, "cmig", name)["status"]["phase"] == "Transferring"  # type: ignore[index]
            with faults.s3_down(env):
                time.sleep(4)
            obj = wait_for(env, "cmig", name, "an end", finished, timeout=180)
            assert obj["status"]["phase"] == "Succeeded", obj["status"]
        assert_runs_on_exactly_one_node(env, container, TARGET)
        check_invariants(env)
    finally:
        remove(env, SOURCE, container)
        remove(env, TARGET, container)


def test_the_source_agent_killed_while_podman_checkpoints_gives_the_container_back_on_the_source(
    local_env: LocalEnv,
) -> None:
    env = local_env
    container = workload(env, SOURCE, mib=160)
    try:
        name = migration(env, SOURCE, container, targetNodeName=TARGET, compress="none")
        # The moment: podman's export is under way, its first bytes in the spool.
        obj = wait_for(env, "ccp", name, "Checkpointing", lambda o: (o.get("status") or {}).get("phase"))
        folder = f"checkpoint_default_{name}_{obj['metadata']['uid']}"

        def exporting() -> bool:
            found = [p for s in spool_dirs(env, SOURCE) for p in Path(s, folder).glob(f"{container}.tar*")]
            return any(p.stat().st_size > 0 for p in found if p.exists())

        deadline = time.monotonic() + 60
        while not exporting():
            assert time.monotonic() < deadline, "the export never began"
            time.sleep(0.01)
        faults.restart_agent(env, SOURCE, kill=True)
        obj = wait_for(env, "cmig", name, "an end", finished, timeout=180)
        reason, message = reason_and_message(obj)
        assert (obj["status"]["phase"], reason) == ("Failed", "CheckpointInterrupted"), obj["status"]
        assert "restored in place" in message or "kept running" in message, message
        # The restore that followed the checkpoint fails with it, and nothing is restored on the target.
        _, restore = children(env, name)
        followed = wait_for(env, "crst", restore, "an end", finished)
        assert reason_and_message(followed)[0] == "CheckpointNotReady", followed["status"]
        assert "fallbackRestoreRef" not in obj["status"]
        assert_runs_on_exactly_one_node(env, container, SOURCE)
        check_invariants(env)
    finally:
        remove(env, SOURCE, container)
        remove(env, TARGET, container)


def test_a_restore_that_fails_on_the_target_brings_the_container_back_on_the_source(local_env: LocalEnv) -> None:
    env = local_env
    # The counter's image under a name node-b does not have: the restore there fails for good
    # (ImageNotFound) after the checkpoint stopped the container and stored its archive.
    image = f"localhost/checkpointer/counter-{SOURCE}-only:latest"
    env.nodes[SOURCE].podman("tag", COUNTER, image)
    container = unique("only-a")
    env.nodes[SOURCE].podman("run", "-d", *owned_by("default"), "--name", container, image)
    try:
        time.sleep(1)
        counted = read_count(env.nodes[SOURCE], container)
        name = migration(env, SOURCE, container, targetNodeName=TARGET)
        obj = env.wait_phase("cmig", name, ["Succeeded", "Failed"])
        reason, message = reason_and_message(obj)
        assert reason == "RestoredOnSource", obj["status"]
        assert "ImageNotFound" in message and f"restored on {SOURCE}" in message, message
        back = get(env, "crst", obj["status"]["fallbackRestoreRef"]["name"])
        assert back is not None and back["status"]["phase"] == "Succeeded" and back["spec"]["nodeName"] == SOURCE
        assert_runs_on_exactly_one_node(env, container, SOURCE)
        assert read_count(env.nodes[SOURCE], container) > counted  # its memory came back with it
        check_invariants(env)
    finally:
        remove(env, SOURCE, container)
        remove(env, TARGET, container)
        env.nodes[SOURCE].podman("rmi", image, check=False)


def test_the_target_agent_killed_while_podman_imports_brings_the_container_back_on_the_source(
    local_env: LocalEnv,
) -> None:
    env = local_env
    container = workload(env, SOURCE)
    try:
        with faults.agent_settings(env, SOURCE, SLOW_UP):
            name = migration(env, SOURCE, container, targetNodeName=TARGET, compress="none")
            _, restore = children(env, name)
            # Podman on the target imports while the archive still goes up: the tail, without which it
            # restores nothing, is held back, and the podman the agent started dies with it.
            wait_for(env, "crst", restore, "podman importing", lambda o: ready(o).get("reason") == "Restoring")
            assert get(env, "ccp", name)["status"]["phase"] == "Uploading"  # type: ignore[index]
            faults.restart_agent(env, TARGET, kill=True)
            obj = wait_for(env, "cmig", name, "an end", finished, timeout=180)
        followed = get(env, "crst", restore)
        assert followed is not None and reason_and_message(followed)[0] == "RestoreUndone", followed
        assert "nothing of this restore runs" in reason_and_message(followed)[1], followed["status"]
        reason, message = reason_and_message(obj)
        assert (obj["status"]["phase"], reason) == ("Failed", "RestoredOnSource"), obj["status"]
        assert "RestoreUndone" in message, message
        assert_runs_on_exactly_one_node(env, container, SOURCE)
        assert not exists(env, TARGET, container), "what podman made on the target was removed"
        check_invariants(env)
    finally:
        remove(env, SOURCE, container)
        remove(env, TARGET, container)


def test_the_source_agent_killed_mid_stream_the_container_runs_on_the_target(local_env: LocalEnv) -> None:
    env = local_env
    container = workload(env, SOURCE)
    try:
        with faults.agent_settings(env, SOURCE, SLOW_UP):
            name = migration(env, SOURCE, container, targetNodeName=TARGET, compress="none")
            _, restore = children(env, name)
            # Some parts published, and the target reading them, before the checkpoint Succeeded.
            wait_for(env, "ccp", name, "two parts published", lambda o: published(o) >= 2)
            following = ("Streaming", "Restoring")
            wait_for(env, "crst", restore, "the stream followed", lambda o: ready(o).get("reason") in following)
            assert get(env, "ccp", name)["status"]["phase"] == "Uploading"  # type: ignore[index]
            faults.restart_agent(env, SOURCE, SLOW_UP, kill=True)  # resumes from its spool, parts announced again
            obj = wait_for(env, "cmig", name, "an end", finished, timeout=180)
            assert obj["status"]["phase"] == "Succeeded", obj["status"]
            assert obj["status"]["downtimeSeconds"] > 0
        assert_runs_on_exactly_one_node(env, container, TARGET)
        key = get(env, "ccp", name)["status"]["archives"][0]["key"]  # type: ignore[index]
        listed = env.s3.client().list_objects_v2(Bucket=env.s3.bucket, Prefix=f"{key}.part-")
        assert not listed.get("Contents"), "the part objects go once the archive is completed"
        check_invariants(env)
    finally:
        remove(env, SOURCE, container)
        remove(env, TARGET, container)
