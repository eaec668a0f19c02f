"""The Helm chart's objects, rendered with the repository's helm, so the local environment grants what it grants.

The agents of the local environment run as processes on the host, not as the chart's DaemonSet, but
with the chart's identity: its agent ServiceAccount, the Roles and ClusterRoles bound to it, and the
admission policy that confines an agent to its own node. Whatever the chart adds to them reaches the
local environment's agents too.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from localenv.controlplane import kubernetes_version
from localenv.procs import BIN, REPO_ROOT, run

CHART = REPO_ROOT / "charts" / "checkpointer"
RELEASE = "checkpointer"
AGENT_SA = "checkpointer-agent"

Objects = list[dict[str, Any]]


def render(namespace: str, values: dict[str, Any]) -> Objects:
    """`helm template` of the chart as release `checkpointer` in `namespace`."""
    with tempfile.TemporaryDirectory(prefix="helm-") as home:
        values_file = Path(home) / "values.yaml"
        values_file.write_text(yaml.safe_dump(values))
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home}
        env |= {f"HELM_{kind}_HOME": f"{home}/{kind.lower()}" for kind in ("CACHE", "CONFIG", "DATA")}
        # This helm is built without the client-go version ldflags, so its default kube version is v1.20.
        flags: list[str | os.PathLike[str]] = ["--namespace", namespace, "--values", values_file]
        flags += ["--kube-version", kubernetes_version()]
        out = run([BIN / "helm", "template", RELEASE, CHART, *flags], env=env)
    return [o for o in yaml.safe_load_all(out.stdout) if o]


def agent_access(objects: Objects) -> Objects:
    """The agent's ServiceAccount, every Role/ClusterRole (and binding) granted to it, and its admission policies.

    In the order they can be applied in: the account, the roles, the bindings, the policies.
    """
    bindings = [
        o
        for o in objects
        if o["kind"] in ("RoleBinding", "ClusterRoleBinding")
        and any(s["kind"] == "ServiceAccount" and s["name"] == AGENT_SA for s in o["subjects"])
    ]

    def grants(binding: dict[str, Any], role: dict[str, Any]) -> bool:
        ref, meta = binding["roleRef"], role["metadata"]
        same_namespace = role["kind"] == "ClusterRole" or meta.get("namespace") == binding["metadata"].get("namespace")
        return (ref["kind"], ref["name"]) == (role["kind"], meta["name"]) and same_namespace

    roles = [o for o in objects if o["kind"] in ("Role", "ClusterRole") and any(grants(b, o) for b in bindings)]
    [account] = [o for o in objects if o["kind"] == "ServiceAccount" and o["metadata"]["name"] == AGENT_SA]
    policies = [o for o in objects if o["kind"] == "ValidatingAdmissionPolicy"]
    policy_names = {p["metadata"]["name"] for p in policies}
    policy_bindings = [
        o
        for o in objects
        if o["kind"] == "ValidatingAdmissionPolicyBinding" and o["spec"]["policyName"] in policy_names
    ]
    return [account, *roles, *bindings, *policies, *policy_bindings]


def agent_pod(objects: Objects, node: str) -> dict[str, Any]:
    """The Pod the chart's DaemonSet would run on `node`; here it only anchors the agent's token to the node.

    Nothing runs it (there are no kubelets): it stays Pending, which the token does not mind. The
    token dies with the Pod, so it must stay while the agent uses the token.
    """
    [daemonset] = [o for o in objects if o["kind"] == "DaemonSet" and o["metadata"]["name"] == AGENT_SA]
    template = daemonset["spec"]["template"]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{AGENT_SA}-{node}",
            "namespace": daemonset["metadata"]["namespace"],
            "labels": template["metadata"].get("labels", {}),
        },
        "spec": {**template["spec"], "nodeName": node},
    }
