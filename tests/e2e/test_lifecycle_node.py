"""Nothing piles up (docs/failure-semantics.md, "Sweeps and the spool's bound"): a TTL deletes a
finished object and its archives; an agent restarted after its object was deleted clears the work
folders, the open uploads and the local checkpoint `keep` left; a spool without room refuses a
checkpoint up front and the container keeps running."""

from __future__ import annotations

import json
import uuid
from typing import Any

from checkpointer.ttl import expiration
from helpers import (
    apply,
    delete,
    events,
    exported,
    finished,
    get,
    ready,
    remove,
    state,
    unique,
    until,
    wait_for,
    workload,
)
from invariants import _local_checkpoint, check_invariants, inspect
from localenv import faults
from localenv.env import NAMESPACE, LocalEnv

MiB = 1024 * 1024


def _succeeded(obj: dict[str, Any]) -> bool:
    return (obj.get("status") or {}).get("phase") == "Succeeded"


def _open_upload_ids(env: LocalEnv, key: str) -> list[str]:
    found = env.s3.client().list_multipart_uploads(Bucket=env.s3.bucket, Prefix=key).get("Uploads", [])
    return [u["UploadId"] for u in found if u["Key"] == key]


def _listed(env: LocalEnv, key: str) -> bool:
    listed = env.s3.client().list_objects_v2(Bucket=env.s3.bucket, Prefix=key).get("Contents", [])
    return any(o["Key"] == key for o in listed)


def test_ttl_sweeps_and_a_bounded_spool(local_env: LocalEnv) -> None:
    env = local_env
    source, node = "node-a", "node-b"  # node-a's agent uses podman's REST API, node-b's the CLI
    expiring = workload(env, source, mib=16)
    container = workload(env, node, mib=16)
    try:
        # A TTL: the checkpoint goes a few seconds after it succeeded, and its archives with it.
        # A restore that fails up front goes too.
        short = exported(env, source, expiring, ttl="15s", leaveRunning=True)
        failing = unique("crst")
        restore = {"nodeName": "nowhere", "source": {"checkpointRef": {"name": short}}, "ttl": "1s"}
        apply(env, "ContainerRestore", failing, restore)
        status = wait_for(env, "ccp", short, "Succeeded", _succeeded, timeout=60)["status"]
        assert status["expiration"] == expiration(status["completionTime"], "15s"), status
        short_key = status["archives"][0]["key"]
        assert _listed(env, short_key)

        # `keep: true` leaves podman's local checkpoint in the container's folder; leaveRunning keeps
        # the container running, so nothing needs that checkpoint as a way back.
        kept = exported(env, node, container, keep=True, leaveRunning=True)
        obj = wait_for(env, "ccp", kept, "Succeeded", _succeeded, timeout=60)
        directory = obj["status"]["archives"][0]["key"].rpartition("/")[0]
        static_dir = str((inspect(env, node, container) or {}).get("StaticDir") or "")
        assert _local_checkpoint(env, node, static_dir), "keep: true kept no local checkpoint"

        # While the agent is down: an upload opened under the checkpoint's folder, the checkpoint
        # deleted, and a work folder whose object never existed.
        env.stop_agent(node)
        stray_key = f"{directory}/stray.tar.zst"
        env.s3.client().create_multipart_upload(Bucket=env.s3.bucket, Key=stray_key)
        assert _open_upload_ids(env, stray_key)
        delete(env, "ccp", kept)
        orphan = env.nodes[node].spool_dir / "checkpointer" / f"checkpoint_default_gone_{uuid.uuid4()}"
        orphan.mkdir(parents=True)
        (orphan / f"{container}.tar").write_bytes(b"\0" * MiB)

        # The agent comes back with a spool capped at 1 MiB: its first sweep clears all three.
        with faults.agent_settings(env, node, {"CHECKPOINTER_SPOOL_MAX_BYTES": str(MiB)}):
            until("the orphan work folder's removal", lambda: not orphan.exists(), timeout=20)
            until("the stray upload's abort", lambda: not _open_upload_ids(env, stray_key), timeout=20)
            until(
                "the kept local checkpoint's removal",
                lambda: not _local_checkpoint(env, node, static_dir),
                timeout=20,
            )
            lease = json.loads(
                env.kubectl("get", "lease", "-n", NAMESPACE, f"checkpointer-agent-{node}", "-o", "json").stdout
            )
            annotations = lease["metadata"].get("annotations") or {}
            assert int(annotations["checkpointer.dev/spool-free-bytes"]) > 0, annotations
            assert int(annotations["checkpointer.dev/spool-used-bytes"]) >= 0, annotations

            # Its memory alone is more than the cap: refused before podman is asked.
            refused = exported(env, node, container)
            obj = wait_for(env, "ccp", refused, "an end", finished, timeout=30)
            message = ready(obj)["message"]
            assert obj["status"]["phase"] == "Failed" and ready(obj)["reason"] == "InsufficientSpace", obj["status"]
            assert "cap (CHECKPOINTER_SPOOL_MAX_BYTES)" in message and "MiB" in message, message
            assert "keeps running" in message, message
            assert state(env, node, container) == "running"
            delete(env, "ccp", refused)

        until("the expired checkpoint's deletion", lambda: get(env, "ccp", short) is None, timeout=30)
        until("the expired restore's deletion", lambda: get(env, "crst", failing) is None, timeout=30)
        assert events(env, short, "Expired"), "no Expired Event"
        assert events(env, failing, "Expired"), "no Expired Event"
        assert not _listed(env, short_key), "the expired checkpoint's archive stays in the bucket"
        assert state(env, source, expiring) == "running"
        check_invariants(env)
    finally:
        remove(env, source, expiring)
        remove(env, node, container)
