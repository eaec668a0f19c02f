"""Faults of a node, injected for real: a spool filesystem that is full, and a podman that is gone
(see docs/failure-semantics.md)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from helpers import MiB, exported, finished, ready, remove, state, uploading, wait_for, workload
from invariants import check_invariants
from localenv import faults
from localenv.env import LocalEnv

NODES = ["node-a", "node-b"]  # node-a's agent uses the REST API, node-b's the CLI


@pytest.mark.parametrize("node", NODES)
def test_a_spool_that_fills_mid_export_gives_the_container_back(local_env: LocalEnv, node: str) -> None:
    env = local_env
    container = workload(env, node, mib=96)
    try:
        # Room for the export of about 100 MiB, so the agent's estimate lets it start; once podman
        # exports into the spool, another writer takes all but 16 MiB of it and the disk fills.
        with faults.small_spool(env, node, 160) as spool:
            settings = {"CHECKPOINTER_SPOOL_DIR": str(spool), "CHECKPOINTER_SPOOL_MIN_FREE_BYTES": "1048576"}
            with faults.agent_settings(env, node, settings):
                name = exported(env, node, container)
                _fill_once_exporting(spool, container, leave=16 * MiB)
                obj = wait_for(env, "ccp", name, "an end", finished, timeout=180)
                assert obj["status"]["phase"] == "Failed"
                assert ready(obj)["reason"] == "InsufficientSpace", obj["status"]
                assert "restored in place" in ready(obj)["message"], ready(obj)["message"]
                assert state(env, node, container) == "running"
                (spool / FILLER).unlink()
                check_invariants(env)
    finally:
        remove(env, node, container)


FILLER = "filler"


def _fill_once_exporting(spool: Path, container: str, leave: int) -> None:
    """Once the export's spool file appears, take all of the spool's free space but `leave` bytes."""
    deadline = time.monotonic() + 60
    while not any(spool.glob(f"checkpoint_*/{container}.tar")):
        assert time.monotonic() < deadline, "the export never started"
        time.sleep(0.02)
    stat = os.statvfs(spool)
    with (spool / FILLER).open("wb") as f:
        os.posix_fallocate(f.fileno(), 0, max(0, stat.f_bavail * stat.f_frsize - leave))


def test_a_spool_without_room_refuses_the_checkpoint_up_front(local_env: LocalEnv) -> None:
    env = local_env
    node = "node-b"
    container = workload(env, node, mib=16)
    try:
        # The default asks for 256 MiB free before any container is stopped.
        with (
            faults.small_spool(env, node, 32) as spool,
            faults.agent_settings(env, node, {"CHECKPOINTER_SPOOL_DIR": str(spool)}),
        ):
            name = exported(env, node, container)
            obj = wait_for(env, "ccp", name, "an end", finished, timeout=60)
            assert ready(obj)["reason"] == "InsufficientSpace", obj["status"]
            assert "keeps running" in ready(obj)["message"]
            assert state(env, node, container) == "running"
            check_invariants(env)
    finally:
        remove(env, node, container)


def test_a_node_whose_podman_is_gone_fails_new_objects_with_a_reason(local_env: LocalEnv) -> None:
    env = local_env
    node = "node-a"  # its agent talks to podman's API service, which is what stops here
    container = workload(env, node, mib=16)
    try:
        with faults.podman_service_down(env, node):
            name = exported(env, node, container)
            obj = wait_for(env, "ccp", name, "an end", finished, timeout=90)
            assert obj["status"]["phase"] == "Failed"
            assert ready(obj)["reason"] == "RuntimeUnavailable", obj["status"]
        assert state(env, node, container) == "running"
        check_invariants(env)
    finally:
        remove(env, node, container)


def test_a_spool_changed_on_the_node_is_not_uploaded_and_the_container_runs_again(local_env: LocalEnv) -> None:
    env = local_env
    node = "node-b"
    container = workload(env, node)
    try:
        with faults.agent_settings(env, node, {"CHECKPOINTER_UPLOAD_BYTES_PER_SECOND": str(4 * MiB)}):
            name = exported(env, node, container)
            obj = wait_for(env, "ccp", name, "upload under way", lambda o: uploading(o, 4 * MiB))
            env.stop_agent(node, kill=True)
            meta = obj["metadata"]
            folder = env.nodes[node].spool_dir / "checkpointer" / f"checkpoint_default_{name}_{meta['uid']}"
            [spool] = folder.glob(f"{container}.tar")
            with spool.open("r+b") as f:  # one byte of the archive flips on the node's disk
                f.seek(spool.stat().st_size // 2)
                byte = f.read(1)
                f.seek(-1, 1)
                f.write(bytes([byte[0] ^ 0xFF]))
        obj = wait_for(env, "ccp", name, "an end", finished, timeout=120)
        assert ready(obj)["reason"] == "ArchiveCorrupt", obj["status"]
        assert "restored in place" in ready(obj)["message"], ready(obj)["message"]
        assert state(env, node, container) == "running"
        check_invariants(env)
    finally:
        remove(env, node, container)
