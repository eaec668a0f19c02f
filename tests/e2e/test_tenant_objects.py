"""What a tenant writes on its own objects besides their spec, as alice, an editor of team-a only.

A finalizer: the controller's keeps a deleted ContainerCheckpoint until its archives are removed and
its containers given back. alice may remove it; the object then vanishes at once, mid-checkpoint,
and the container it stopped must still run again (docs/security.md, "Every field a tenant writes").
"""

from __future__ import annotations

import json
import time

import pytest

from helpers import remove, unique, until
from invariants import check_invariants
from localenv.images import MEMORY, owned_by, wait_for_log
from tenants import NODE, TEAM_A, Tenants

pytestmark = pytest.mark.e2e


def test_a_checkpoint_whose_finalizer_is_removed_in_flight_gives_its_container_back(tenants: Tenants) -> None:
    t, env = tenants, tenants.env
    node = env.nodes[NODE]
    container = unique("memory")
    # Enough memory that CRIU's dump and the export outlast a patch and a delete.
    node.podman("run", "-d", *owned_by(TEAM_A), "--name", container, MEMORY, "384")
    wait_for_log(node, container, "ready")
    try:
        name = t.create("ContainerCheckpoint", TEAM_A, {"containers": [container], "export": {}, "compress": "none"})
        cp = env.control_plane
        deadline = time.monotonic() + 60
        while True:
            obj = json.loads(cp.kubectl("get", "ccp", name, "-n", TEAM_A, "-o", "json", kubeconfig=t.alice).stdout)
            if (obj.get("status") or {}).get("phase") == "Checkpointing" and obj["metadata"].get("finalizers"):
                break
            assert time.monotonic() < deadline, f"never Checkpointing with the controller's finalizer: {obj}"
            time.sleep(0.1)
        # As alice: deleted, then the finalizer taken off (before the deletion kopf would add it back at
        # once; after it nothing may be added), so nothing holds the object any more.
        cp.kubectl("delete", "ccp", name, "-n", TEAM_A, "--wait=false", kubeconfig=t.alice)
        patch = json.dumps({"metadata": {"finalizers": None}})
        cp.kubectl("patch", "ccp", name, "-n", TEAM_A, "--type=merge", "-p", patch, kubeconfig=t.alice)
        assert cp.kubectl("get", "ccp", name, "-n", TEAM_A, kubeconfig=t.alice, check=False).returncode != 0

        # The agent finds the object gone at its next write, and restores what it stopped in place.
        until(
            f"{container} given back after a vanished checkpoint",
            lambda: t.state(container) == "running",
            timeout=120,
            last=lambda: t.state(container),
        )
        check_invariants(env)
    finally:
        remove(env, NODE, container)
