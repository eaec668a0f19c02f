"""Faults of the storage, injected for real: the S3 server stopped mid-upload, for a while and for
good, and a ContainerCheckpoint deleted while it uploads (see docs/failure-semantics.md)."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

from helpers import (
    MiB,
    assert_stored_as_reported,
    delete,
    events,
    exported,
    finished,
    ready,
    remove,
    state,
    uploading,
    wait_for,
    wait_storage,
    workload,
)
from invariants import check_invariants
from localenv import faults
from localenv.env import STORAGE, LocalEnv

NODE = "node-a"
# A slow uplink keeps the upload going long enough to break it in the middle.
SLOW = {
    "CHECKPOINTER_UPLOAD_BYTES_PER_SECOND": str(4 * MiB),
    "CHECKPOINTER_UPLOAD_RETRY_SECONDS": "2",
    "CHECKPOINTER_UPLOAD_RETRY_MAX_SECONDS": "8",
}


def test_s3_down_for_30s_mid_upload_retries_with_backoff_and_succeeds(local_env: LocalEnv) -> None:
    env = local_env
    container = workload(env, NODE)
    try:
        with faults.agent_settings(env, NODE, SLOW):
            name = exported(env, NODE, container)
            wait_for(env, "ccp", name, "upload under way", lambda o: uploading(o, 8 * MiB))
            delays: list[int] = []
            with faults.s3_down(env):
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    obj = wait_for(env, "ccp", name, "an answer", lambda o: True)
                    found = re.search(r"retrying in (\d+)s", str(ready(obj).get("message")))
                    retrying = ready(obj).get("reason") == "UploadRetrying" and found
                    if retrying and found and (not delays or int(found.group(1)) != delays[-1]):
                        delays.append(int(found.group(1)))
                    time.sleep(0.5)
            assert len(delays) >= 2 and delays == sorted(delays) and delays[-1] > delays[0], (
                f"no growing backoff while S3 was down: {delays}"
            )
            obj = wait_for(env, "ccp", name, "Succeeded", finished)
            assert obj["status"]["phase"] == "Succeeded", obj["status"]
            [archive] = obj["status"]["archives"]
            assert_stored_as_reported(env, archive)
        check_invariants(env)
    finally:
        remove(env, NODE, container)


def test_s3_down_past_the_deadline_fails_with_upload_failed_and_keeps_the_spool(local_env: LocalEnv) -> None:
    env = local_env
    container = workload(env, NODE)
    try:
        with faults.agent_settings(env, NODE, {**SLOW, "CHECKPOINTER_UPLOAD_DEADLINE_SECONDS": "12"}):
            name = exported(env, NODE, container)
            wait_for(env, "ccp", name, "upload under way", lambda o: uploading(o, 8 * MiB))
            with faults.s3_down(env):
                obj = wait_for(env, "ccp", name, "Failed", lambda o: o["status"].get("phase") == "Failed", timeout=90)
                assert ready(obj)["reason"] == "UploadFailed", obj["status"]
                spool = Path(re.findall(r" at (/\S+):", ready(obj)["message"])[0])
                assert spool.is_file() and spool.stat().st_size > 0, f"the spool is not kept on the node: {spool}"
                [event] = events(env, name, "UploadFailed")
                assert str(spool) in event
            assert state(env, NODE, container) == "exited"  # stopped, with its archive on the node
            # Once S3 answers again, the agent aborts the upload it gave up on.
            check_invariants(env)
            delete(env, "ccp", name)
            # The Warning named the spool to an administrator: it stays, past the object and its sweeps
            # (every 5 s here), until they remove it.
            time.sleep(8)
            assert spool.is_file(), "the spool an UploadFailed Warning named went with its object"
        shutil.rmtree(spool.parent)  # as the administrator does (docs/operations.md)
        # podman's local checkpoint of the container stays.
        check_invariants(env, stopped=[(NODE, container)])
    finally:
        remove(env, NODE, container)


def test_deleting_a_checkpoint_mid_upload_leaves_nothing_and_the_container_runs(local_env: LocalEnv) -> None:
    env = local_env
    container = workload(env, NODE)
    try:
        with faults.agent_settings(env, NODE, SLOW):
            name = exported(env, NODE, container)
            obj = wait_for(env, "ccp", name, "upload under way", lambda o: uploading(o, 8 * MiB))
            uid = obj["metadata"]["uid"]
            delete(env, "ccp", name)
            s3 = env.s3.client()
            assert not s3.list_objects_v2(Bucket=env.s3.bucket, Prefix=f"default/{name}-").get("Contents")
            assert not s3.list_multipart_uploads(Bucket=env.s3.bucket).get("Uploads")
            spool = env.nodes[NODE].spool_dir / "checkpointer"
            assert not [p for p in spool.iterdir() if uid in p.name]
            assert state(env, NODE, container) == "running"
        check_invariants(env, stopped=[(NODE, container)])
    finally:
        remove(env, NODE, container)


def test_a_storage_back_from_an_outage_takes_new_checkpoints_at_once(local_env: LocalEnv) -> None:
    env = local_env
    container = workload(env, NODE, mib=16)
    try:
        with faults.s3_down(env):
            # The controller's own look at the bucket finds it down (it looks every 10 s here).
            wait_storage(env, STORAGE, "Unavailable")
        # S3 is back, the storage's status still says Unavailable: the controller asks the bucket again.
        name = exported(env, NODE, container)
        obj = wait_for(env, "ccp", name, "an end", finished)
        assert obj["status"]["phase"] == "Succeeded", obj["status"]
        check_invariants(env)
    finally:
        remove(env, NODE, container)


def test_deleting_a_checkpoint_of_two_containers_gives_both_back(local_env: LocalEnv) -> None:
    env = local_env
    first, second = workload(env, NODE, mib=16), workload(env, NODE)
    try:
        with faults.agent_settings(env, NODE, SLOW):
            name = exported(env, NODE, first, containers=[first, second])
            # The first archive is in the bucket and its container stopped; the second one uploads.
            wait_for(
                env, "ccp", name, "the second upload", lambda o: uploading(o, 8 * MiB) and o["status"].get("archives")
            )
            delete(env, "ccp", name)
            assert state(env, NODE, first) == "running"
            assert state(env, NODE, second) == "running"
            assert not env.s3.client().list_objects_v2(Bucket=env.s3.bucket, Prefix=f"default/{name}-").get("Contents")
        check_invariants(env, stopped=[(NODE, first), (NODE, second)])
    finally:
        remove(env, NODE, first, second)
