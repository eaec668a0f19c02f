"""A ContainerRestore that names a ContainerCheckpoint still running: it reads the parts as they land
and podman imports while they arrive (services/pipeline.py); it restores nothing unless the
checkpoint succeeds and every byte is the one the source hashed."""

from __future__ import annotations

import time
from typing import Any

from helpers import apply, counter, exists, get, node_name, reason_of, unique, until, workload
from invariants import check_invariants
from localenv.env import LocalEnv
from localenv.images import read_count

STREAM = {"checkpointer.dev/stream": "true"}
# The target runs the CLI runtime, which feeds podman's import through a FIFO (hack/localenv/env.py).
SOURCE, TARGET = "node-a", "node-b"


def _checkpoint(env: LocalEnv, container: str, **spec: Any) -> str:
    name = unique("ccp")
    env.apply(
        {
            "apiVersion": "checkpointer.dev/v1alpha1",
            "kind": "ContainerCheckpoint",
            "metadata": {"name": name, "namespace": "default", "annotations": STREAM},
            "spec": {"nodeName": node_name(env, SOURCE), "containers": [container], "export": {}, **spec},
        }
    )
    return name


def _restore(env: LocalEnv, checkpoint: str) -> str:
    name = unique("crst")
    apply(
        env,
        "ContainerRestore",
        name,
        {"nodeName": node_name(env, TARGET), "source": {"checkpointRef": {"name": checkpoint}}},
    )
    return name


def _reasons_until_finished(
    env: LocalEnv, kind: str, name: str, timeout: float = 180
) -> tuple[dict[str, Any], list[str]]:
    """The object once finished, and every Ready reason it was seen with on the way."""
    seen: list[str] = []

    def finished() -> dict[str, Any] | None:
        obj = get(env, kind, name)
        if obj is None:
            return None
        reason = reason_of(obj) if (obj.get("status") or {}).get("conditions") else ""
        if reason and (not seen or seen[-1] != reason):
            seen.append(reason)
        return obj if (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed") else None

    return until(f"{kind} {name} to finish", finished, timeout, interval=0.05), seen


def test_a_pipelined_restore_continues_the_count_on_the_other_node(local_env: LocalEnv) -> None:
    container = counter(local_env, SOURCE, running_for=1)
    checkpoint = _checkpoint(local_env, container)
    name = _restore(local_env, checkpoint)  # created with the checkpoint, as a migration does
    obj, seen = _reasons_until_finished(local_env, "crst", name)
    assert obj["status"]["phase"] == "Succeeded", obj["status"]
    assert "Streaming" in seen, seen
    ccp = get(local_env, "ccp", checkpoint)
    assert ccp is not None and ccp["status"]["phase"] == "Succeeded"
    counted = int(local_env.nodes[SOURCE].podman("logs", container).stdout.decode().split()[-1])
    time.sleep(1.5)
    assert read_count(local_env.nodes[TARGET], container) > counted
    local_env.nodes[SOURCE].podman("rm", "-f", container)
    local_env.nodes[TARGET].podman("rm", "-f", container)
    check_invariants(local_env)


def test_a_restore_whose_agent_comes_after_its_checkpoint_succeeded_still_streams(local_env: LocalEnv) -> None:
    env = local_env
    container = counter(env, SOURCE, running_for=1)
    # The target's agent away while the checkpoint runs and succeeds, as an agent just started is
    # late to a restore created with a small checkpoint: its Lease still lets the controller accept it.
    env.stop_agent(TARGET)
    try:
        checkpoint = _checkpoint(env, container)
        name = _restore(env, checkpoint)
        env.wait_phase("ccp", checkpoint, ["Succeeded"], timeout=120)
        accepted = get(env, "crst", name)
        assert accepted is not None and not (accepted["status"].get("archive") or {}).get("key"), accepted["status"]
    finally:
        env.start_agent(TARGET, {})
    obj, seen = _reasons_until_finished(env, "crst", name)
    assert obj["status"]["phase"] == "Succeeded", obj["status"]
    assert "Downloading" not in seen, seen
    log = (env.supervisor.log_dir / f"agent-{TARGET}.log").read_text(errors="replace")
    assert f"restore default/{name}: streams " in log and f"from {checkpoint} (Succeeded" in log
    counted = int(env.nodes[SOURCE].podman("logs", container).stdout.decode().split()[-1])
    time.sleep(1.5)
    assert read_count(env.nodes[TARGET], container) > counted
    env.nodes[SOURCE].podman("rm", "-f", container)
    env.nodes[TARGET].podman("rm", "-f", container)
    check_invariants(env)


def test_a_checkpoint_that_ends_without_its_archive_fails_its_restore_and_nothing_runs_on_the_target(
    local_env: LocalEnv,
) -> None:
    container = workload(local_env, SOURCE, mib=384)
    checkpoint = _checkpoint(local_env, container, compress="none")
    name = _restore(local_env, checkpoint)
    until(
        f"restore {name} to stream",
        lambda: (
            (obj := get(local_env, "crst", name)) is not None
            and (obj.get("status") or {}).get("conditions")
            and reason_of(obj) in ("Streaming", "Restoring")
        ),
        120,
        interval=0.05,
    )
    # Deleted in flight, the checkpoint cancels: its container is restored in place, nothing is stored.
    local_env.kubectl("delete", "ccp", checkpoint, "-n", "default", "--wait=false")
    obj, _ = _reasons_until_finished(local_env, "crst", name)
    assert obj["status"]["phase"] == "Failed", obj["status"]
    assert reason_of(obj) in ("CheckpointNotFound", "CheckpointNotReady", "ArchiveNotFound"), obj["status"]
    assert "nothing was restored" in str(obj["status"]["conditions"])
    assert not exists(local_env, TARGET, container), "the target holds nothing of the restore"
    until(
        f"{container} running on {SOURCE}",
        lambda: (
            local_env.nodes[SOURCE]
            .podman("inspect", "--format", "{{.State.Status}}", container)
            .stdout.decode()
            .strip()
            == "running"
        ),
        60,
    )
    check_invariants(local_env)
    local_env.nodes[SOURCE].podman("rm", "-f", container)


def test_a_tampered_part_is_refused_before_podman_sees_it(local_env: LocalEnv) -> None:
    env = local_env
    # A slow uplink keeps the checkpoint running while the part is changed and the restore starts.
    env.stop_agent(SOURCE)
    env.start_agent(SOURCE, {"CHECKPOINTER_UPLOAD_BYTES_PER_SECOND": str(4 * 1024 * 1024)})
    try:
        container = workload(env, SOURCE, mib=64)
        checkpoint = _checkpoint(env, container, compress="none")
        stream = until(
            f"checkpoint {checkpoint} to publish its first part",
            lambda: (
                (obj := get(env, "ccp", checkpoint)) is not None
                and ((obj.get("status") or {}).get("streams") or [{}])[0].get("digests")
                and obj["status"]["streams"][0]
            ),
            120,
            interval=0.05,
        )
        s3, bucket = env.s3.client(), env.s3.bucket
        # The first part as anyone with the bucket's credentials could leave it: other bytes, same length.
        s3.put_object(Bucket=bucket, Key=f"{stream['key']}.part-00001", Body=b"\0" * int(stream["partSize"]))
        name = _restore(env, checkpoint)
        obj, _ = _reasons_until_finished(env, "crst", name)
        assert obj["status"]["phase"] == "Failed", obj["status"]
        assert reason_of(obj) == "ArchiveCorrupt", obj["status"]
        assert "part 1" in str(obj["status"]["conditions"]), obj["status"]
        assert not exists(env, TARGET, container), "podman never imported it"
        done = env.wait_phase("ccp", checkpoint, ["Succeeded", "Failed"], timeout=180)
        assert done["status"]["phase"] == "Succeeded", "the bucket's stored archive is whole: its own bytes"
    finally:
        env.stop_agent(SOURCE)
        env.start_agent(SOURCE, {})
    env.nodes[SOURCE].podman("rm", "-f", container)
    check_invariants(env)
