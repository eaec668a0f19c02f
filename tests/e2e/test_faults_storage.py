"""Faults of the storage, injected for real: the S3 server stopped mid-upload, for a while and for
good, and a ContainerCheckpoint deleted while it uploads (see docs/failure-semantics.md).

The last two tests share one outage of S3: an upload is under way on each node when it begins, one
agent retries through it and the other gives up at its deadline (the fixture s3_outage).
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from helpers import (
    MiB,
    assert_stored_as_reported,
    delete,
    events,
    exported,
    finished,
    get,
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


# --- one S3 outage, two uploads under way -----------------------------------------------------------


@dataclass
class Outage:
    """What one outage of S3, 30 s long, did to two uploads under way when it began: node-a's agent
    retries through it, node-b's gives up at its deadline while S3 is still down."""

    retrying: str  # node-a's ContainerCheckpoint
    retrying_container: str
    delays: list[int]  # the backoffs its status announced while S3 was down, each once
    failing: str  # node-b's
    failing_container: str
    failed: dict[str, Any] | None  # node-b's object as it was first seen Failed, while S3 was down


RETRYING, FAILING = "node-a", "node-b"


@pytest.fixture(scope="module")
def s3_outage(local_env: LocalEnv) -> Iterator[Outage]:
    """Both nodes' agents slow, node-b's with a deadline of 12 s; an upload under way on each when S3
    stops, for 30 s. The agents keep their settings until the module ends: its last two tests use it."""
    env = local_env
    retrying, failing = workload(env, RETRYING), workload(env, FAILING)
    try:
        with (
            faults.agent_settings(env, RETRYING, SLOW),
            faults.agent_settings(env, FAILING, {**SLOW, "CHECKPOINTER_UPLOAD_DEADLINE_SECONDS": "12"}),
        ):
            outage = Outage(
                exported(env, RETRYING, retrying), retrying, [], exported(env, FAILING, failing), failing, None
            )
            wait_for(env, "ccp", outage.retrying, "upload under way", lambda o: uploading(o, 8 * MiB))
            wait_for(env, "ccp", outage.failing, "upload under way", lambda o: uploading(o, 8 * MiB))
            with faults.s3_down(env):
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    obj = wait_for(env, "ccp", outage.retrying, "an answer", lambda o: True)
                    found = re.search(r"retrying in (\d+)s", str(ready(obj).get("message")))
                    retrying_now = ready(obj).get("reason") == "UploadRetrying" and found
                    if retrying_now and found and (not outage.delays or int(found.group(1)) != outage.delays[-1]):
                        outage.delays.append(int(found.group(1)))
                    failed = get(env, "ccp", outage.failing)
                    if outage.failed is None and failed is not None and failed["status"].get("phase") == "Failed":
                        outage.failed = failed
                    time.sleep(0.5)
            yield outage
    finally:
        remove(env, RETRYING, retrying)
        remove(env, FAILING, failing)


def test_s3_down_for_30s_mid_upload_retries_with_backoff_and_succeeds(local_env: LocalEnv, s3_outage: Outage) -> None:
    env, outage = local_env, s3_outage
    delays = outage.delays
    assert len(delays) >= 2 and delays == sorted(delays) and delays[-1] > delays[0], (
        f"no growing backoff while S3 was down: {delays}"
    )
    obj = wait_for(env, "ccp", outage.retrying, "Succeeded", finished)
    assert obj["status"]["phase"] == "Succeeded", obj["status"]
    [archive] = obj["status"]["archives"]
    assert_stored_as_reported(env, archive)
    check_invariants(env)


def test_s3_down_past_the_deadline_fails_with_upload_failed_and_keeps_the_spool(
    local_env: LocalEnv, s3_outage: Outage
) -> None:
    env, outage = local_env, s3_outage
    name, container, obj = outage.failing, outage.failing_container, outage.failed
    assert obj is not None, f"{name} did not fail while S3 was down: {(get(env, 'ccp', name) or {}).get('status')}"
    assert ready(obj)["reason"] == "UploadFailed", obj["status"]
    spool = Path(re.findall(r" at (/\S+):", ready(obj)["message"])[0])
    assert spool.is_file() and spool.stat().st_size > 0, f"the spool is not kept on the node: {spool}"
    [event] = events(env, name, "UploadFailed")
    assert str(spool) in event
    assert state(env, FAILING, container) == "exited"  # stopped, with its archive on the node
    # Once S3 answers again, the agent aborts the upload it gave up on.
    check_invariants(env)
    delete(env, "ccp", name)
    # The Warning named the spool to an administrator: it stays, past the object and its sweeps
    # (every 5 s here), until they remove it.
    time.sleep(8)
    assert spool.is_file(), "the spool an UploadFailed Warning named went with its object"
    shutil.rmtree(spool.parent)  # as the administrator does (docs/operations.md)
    # podman's local checkpoint of the container stays.
    check_invariants(env, stopped=[(FAILING, container)])
