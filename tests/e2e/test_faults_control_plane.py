"""Faults of the control plane, injected for real: kube-apiserver stopped mid-checkpoint, and a
controller killed between its Scheduled status and its node label (see docs/failure-semantics.md)."""

from __future__ import annotations

import json
import time

from helpers import MiB, assert_stored_as_reported, exported, finished, get, remove, uploading, wait_for, workload
from invariants import check_invariants
from localenv import faults
from localenv.env import STORAGE, LocalEnv

NODE = "node-b"


def test_api_server_down_for_20s_mid_checkpoint(local_env: LocalEnv) -> None:
    env = local_env
    container = workload(env, NODE)
    try:
        with faults.agent_settings(env, NODE, {"CHECKPOINTER_UPLOAD_BYTES_PER_SECOND": str(4 * MiB)}):
            name = exported(env, NODE, container)
            wait_for(env, "ccp", name, "upload under way", lambda o: uploading(o, 4 * MiB))
            with faults.apiserver_down(env):
                time.sleep(20)
            obj = wait_for(env, "ccp", name, "an end", finished, 180)
            assert obj["status"]["phase"] == "Succeeded", obj["status"]
            [archive] = obj["status"]["archives"]
            assert_stored_as_reported(env, archive)
        check_invariants(env)
    finally:
        remove(env, NODE, container)


def test_an_object_left_scheduled_without_its_label_completes(local_env: LocalEnv) -> None:
    env = local_env
    container = workload(env, NODE, mib=16)
    try:
        # The controller dies after its Scheduled status write and before its label patch: with no
        # controller running, the object is made and given exactly that status, as the dead one left it.
        env.stop_controller(kill=True)
        try:
            name = exported(env, NODE, container)
            status = {
                "status": {
                    "phase": "Scheduled",
                    "nodeName": NODE,
                    "storageRef": {"name": STORAGE},
                    "observedGeneration": 1,
                }
            }
            env.kubectl(
                "patch", "ccp", name, "-n", "default", "--subresource=status", "--type=merge", "-p", json.dumps(status)
            )
            time.sleep(2)
            obj = get(env, "ccp", name)
            assert obj is not None and obj["status"]["phase"] == "Scheduled" and not obj["metadata"].get("labels")
        finally:
            env.start_controller()
        obj = wait_for(env, "ccp", name, "an end", finished, 120)
        assert obj["status"]["phase"] == "Succeeded", obj["status"]
        check_invariants(env)
    finally:
        remove(env, NODE, container)
