"""The tenants of the e2e tests: a user who can edit only namespace team-a, through the chart's aggregated roles.

The user is a client certificate with the built-in `edit` ClusterRole bound in team-a; what team-b owns is
made with the admin's credentials, as team-b's own users would. One set for the whole session
(tests/conftest.py), shared by every file that tries something as a tenant.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from botocore.exceptions import ClientError

from helpers import unique
from localenv.controlplane import kubernetes_version
from localenv.env import NAMESPACE, LocalEnv
from localenv.images import COUNTER, owned_by, read_count
from localenv.procs import BIN, REPO_ROOT, require, run

NODE = "node-b"  # the CLI runtime: the one whose container list gives creation times in whole seconds
TEAM_A, TEAM_B = "team-a", "team-b"
USER = "alice"


@dataclass
class Tenants:
    env: LocalEnv
    alice: Path  # kubeconfig of a user who may edit team-a only
    ours: str  # a running container of team-a on NODE
    theirs: str  # a running container of team-b on NODE

    def create(self, kind: str, namespace: str, spec: dict[str, Any], as_alice: bool = True, node: str = NODE) -> str:
        name = unique("ccp" if kind == "ContainerCheckpoint" else "crst")
        obj = {
            "apiVersion": "checkpointer.dev/v1alpha1",
            "kind": kind,
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"nodeName": node, **spec},
        }
        kubeconfig = self.alice if as_alice else None
        self.env.control_plane.kubectl("create", "-f", "-", kubeconfig=kubeconfig, input=json.dumps(obj))
        return name

    def finished(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        return self.env.wait_phase(kind, name, ["Succeeded", "Failed"], namespace=namespace)

    def delete(self, kind: str, name: str) -> None:
        self.env.control_plane.kubectl(
            "delete", kind, name, "-n", TEAM_A, "--wait=true", "--timeout=60s", kubeconfig=self.alice
        )

    def state(self, container: str) -> str:
        return (
            self.env.nodes[NODE].podman("inspect", "--format", "{{.State.Status}}", container).stdout.decode().strip()
        )

    def stored(self, key: str) -> bool:
        try:
            self.env.s3.client().head_object(Bucket=self.env.s3.bucket, Key=key)
        except ClientError:
            return False
        return True


def render_aggregated_roles() -> list[dict[str, Any]]:
    """The chart's ClusterRoles that extend the built-in admin, edit and view roles, as helm renders them."""
    helm = BIN / "helm"
    require(helm.exists(), f"helm is not built ({helm}): run hack/build/tools.sh")
    with tempfile.TemporaryDirectory(prefix="helm-") as home:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home, "HELM_CACHE_HOME": f"{home}/cache"}
        env |= {"HELM_CONFIG_HOME": f"{home}/config", "HELM_DATA_HOME": f"{home}/data"}
        out = run(
            [
                helm,
                "template",
                "checkpointer",
                REPO_ROOT / "charts" / "checkpointer",
                "--namespace",
                NAMESPACE,
                "--kube-version",
                kubernetes_version(),
                "--show-only",
                "templates/aggregate-clusterroles.yaml",
            ],
            env=env,
            timeout=120,
        )
    return [o for o in yaml.safe_load_all(out.stdout.decode()) if o]


def labelled_counter(env: LocalEnv, namespace: str, node: str = NODE) -> str:
    name = unique("counter")
    env.nodes[node].podman("run", "-d", *owned_by(namespace), "--name", name, COUNTER)
    read_count(env.nodes[node], name)
    return name


def tenants_of(env: LocalEnv) -> Iterator[Tenants]:
    """Sets up the tenants once; yields them; removes their containers."""
    cp = env.control_plane
    roles = render_aggregated_roles()
    assert {r["kind"] for r in roles} == {"ClusterRole"}
    env.apply(*roles)
    for namespace in (TEAM_A, TEAM_B):
        env.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    cp.kubectl("create", "rolebinding", "alice-edit", "--clusterrole=edit", f"--user={USER}", "-n", TEAM_A)
    alice = cp.kubeconfig_for_user(USER)

    def can(verb: str, resource: str, namespace: str) -> bool:
        out = cp.kubectl("auth", "can-i", verb, resource, "-n", namespace, kubeconfig=alice, check=False)
        return bool(out.stdout.strip() == "yes")

    deadline = time.monotonic() + 60
    while not can("create", "containercheckpoints.checkpointer.dev", TEAM_A):
        assert time.monotonic() < deadline, "the controller-manager did not aggregate the chart's roles into edit"
        time.sleep(0.5)
    # The user is what the issue describes: an editor of team-a, and nothing in team-b.
    assert can("create", "containerrestores.checkpointer.dev", TEAM_A)
    assert not can("create", "containercheckpoints.checkpointer.dev", TEAM_B)
    assert not can("get", "containercheckpoints.checkpointer.dev", TEAM_B)
    ours, theirs = labelled_counter(env, TEAM_A), labelled_counter(env, TEAM_B)
    try:
        yield Tenants(env, alice, ours, theirs)
    finally:
        for container in (ours, theirs):
            env.nodes[NODE].podman("rm", "-f", "-t", "0", container, check=False)
