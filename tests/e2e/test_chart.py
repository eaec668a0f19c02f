"""The Helm chart: lint, rendering, a server-side dry run, and a real install whose RBAC is least privilege.

The API server is a real one (tests/e2e/test_control_plane.py). The chart is checked twice for
privileges: `kubectl auth can-i` for each permission the design allows or forbids, and the real
controller and agent processes running with nothing but the chart's ServiceAccounts.
"""

from __future__ import annotations

import base64
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from helpers import until
from localenv.chart import agent_pod
from localenv.controlplane import ControlPlane, kubernetes_version
from localenv.procs import BIN, REPO_ROOT, Supervisor, free_port, require, run

pytestmark = pytest.mark.e2e

CHART = REPO_ROOT / "charts" / "checkpointer"
HELM = BIN / "helm"
RELEASE = "checkpointer"
NAMESPACE = "checkpointer-system"
CONTROLLER_SA = "checkpointer-controller"
AGENT_SA = "checkpointer-agent"
STORAGE_SECRET = "checkpointer-storage"
WORKLOADS = "team"
NODE = "node-1"
# Where the chart's CheckpointStorage points: a closed port, so validation ends in Unavailable.
S3_PORT = free_port()

STORAGE_VALUES: dict[str, Any] = {
    "storage": {
        "create": True,
        "bucket": "checkpoints",
        "endpoint": f"http://127.0.0.1:{S3_PORT}",
        "region": "us-east-1",
        "prefix": "cluster-a",
        "forcePathStyle": True,
        "accessKeyID": "AKIDCHART",
        "secretAccessKey": "chart-secret-key",
    }
}

Objects = list[dict[str, Any]]
CLUSTER_SCOPED = ("ClusterRole", "ClusterRoleBinding", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")


# --- helpers -------------------------------------------------------------------------------------


@dataclass
class Helm:
    """The built helm, with its cache and config under a temporary directory (never ~/.cache)."""

    home: Path

    def __call__(self, *args: str | os.PathLike[str], check: bool = True, timeout: float = 120) -> str:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
            "HELM_CACHE_HOME": str(self.home / "cache"),
            "HELM_CONFIG_HOME": str(self.home / "config"),
            "HELM_DATA_HOME": str(self.home / "data"),
        }
        proc = run([HELM, *args], env=env, timeout=timeout, check=check)
        return proc.stdout.decode() + proc.stderr.decode()

    def values_file(self, values: dict[str, Any]) -> Path:
        path = self.home / f"values-{len(list(self.home.glob('values-*')))}.yaml"
        path.write_text(yaml.safe_dump(values))
        return path

    def template(self, values: dict[str, Any] | None = None, *extra: str, namespace: str = NAMESPACE) -> str:
        args: list[str | os.PathLike[str]] = [
            "template",
            RELEASE,
            CHART,
            "--namespace",
            namespace,
            # This helm is built without the client-go version ldflags, so its default is v1.20.
            "--kube-version",
            kubernetes_version(),
        ]
        if values:
            args += ["--values", self.values_file(values)]
        return self(*args, *extra)

    def render(self, values: dict[str, Any] | None = None, *extra: str) -> Objects:
        return [o for o in yaml.safe_load_all(self.template(values, *extra)) if o]

    def refusal(self, values: dict[str, Any]) -> str:
        args = ["template", RELEASE, str(CHART), "--kube-version", kubernetes_version()]
        out = self(*args, "--values", self.values_file(values), check=False)
        assert "Error" in out, f"helm accepted {values}"
        return out


def find(objects: Objects, kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def kinds(objects: Objects) -> list[tuple[str, str]]:
    return sorted((o["kind"], o["metadata"]["name"]) for o in objects)


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    require(HELM.exists(), f"helm is not built ({HELM}): run hack/build/tools.sh")
    return Helm(tmp_path_factory.mktemp("helm"))


@pytest.fixture(scope="module")
def installed(cp: ControlPlane, helm: Helm) -> str:
    """`helm install` for real, with a storage, CRDs from the chart; returns helm's output with NOTES."""
    out = helm(
        "install",
        RELEASE,
        CHART,
        "--namespace",
        NAMESPACE,
        "--create-namespace",
        "--values",
        helm.values_file(STORAGE_VALUES),
        "--kubeconfig",
        cp.kubeconfig,
    )
    cp.kubectl("create", "namespace", WORKLOADS)
    cp.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}}))
    return out


# --- no cluster: lint and rendering --------------------------------------------------------------


@pytest.mark.parametrize("values", [{}, STORAGE_VALUES], ids=["defaults", "storage"])
def test_lint_is_clean_in_strict_mode(helm: Helm, values: dict[str, Any]) -> None:
    args = ["lint", "--strict", "--kube-version", kubernetes_version(), str(CHART)]
    if values:
        args += ["--values", str(helm.values_file(values))]
    out = helm(*args)
    assert "1 chart(s) linted, 0 chart(s) failed" in out
    assert "[WARNING]" not in out and "[ERROR]" not in out, out


def test_defaults_render_controller_and_agent_without_storage(helm: Helm) -> None:
    objects = helm.render()
    assert kinds(objects) == [
        ("ClusterRole", "checkpointer-agent"),
        ("ClusterRole", "checkpointer-controller"),
        ("ClusterRole", "checkpointer-edit"),
        ("ClusterRole", "checkpointer-view"),
        ("ClusterRoleBinding", "checkpointer-agent"),
        ("ClusterRoleBinding", "checkpointer-controller"),
        ("DaemonSet", "checkpointer-agent"),
        ("Deployment", "checkpointer-controller"),
        ("Role", "checkpointer-agent"),
        ("Role", "checkpointer-controller"),
        ("RoleBinding", "checkpointer-agent"),
        ("RoleBinding", "checkpointer-controller"),
        ("Service", "checkpointer-agent-metrics"),
        ("Service", "checkpointer-controller-metrics"),
        ("ServiceAccount", "checkpointer-agent"),
        ("ServiceAccount", "checkpointer-controller"),
        ("ValidatingAdmissionPolicy", "checkpointer-agent-own-node"),
        ("ValidatingAdmissionPolicyBinding", "checkpointer-agent-own-node"),
    ]
    for obj in objects:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "checkpointer"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/version"] == "0.1.0"
        assert labels["helm.sh/chart"] == "checkpointer-0.1.0"
        if obj["kind"] not in CLUSTER_SCOPED:
            assert obj["metadata"]["namespace"] == NAMESPACE

    deployment = find(objects, "Deployment")
    # A leader and a standby; a rollout adds a standby before it stops an old pod.
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == CONTROLLER_SA
    assert pod["securityContext"]["runAsNonRoot"] is True
    [controller] = pod["containers"]
    assert controller["image"] == "localhost/checkpointer:0.1.0"
    assert [*controller["command"], *controller["args"]] == ["checkpointer", "controller"]
    assert env_of(controller)["CHECKPOINTER_NAMESPACE"] == NAMESPACE
    assert env_of(controller)["CHECKPOINTER_POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert controller["securityContext"]["allowPrivilegeEscalation"] is False
    assert "privileged" not in controller["securityContext"]

    daemonset = find(objects, "DaemonSet")
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["hostPID"] is True
    assert pod["serviceAccountName"] == AGENT_SA
    assert pod["tolerations"] == [{"operator": "Exists"}]
    [agent] = pod["containers"]
    assert [*agent["command"], *agent["args"]] == ["checkpointer", "agent"]
    assert agent["securityContext"]["privileged"] is True
    assert agent["resources"]["limits"]["memory"] == "512Mi"
    env = env_of(agent)
    assert env["CHECKPOINTER_NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["CHECKPOINTER_NAMESPACE"] == NAMESPACE
    assert env["CHECKPOINTER_PODMAN_MODE"] == "api"
    assert env["CHECKPOINTER_PODMAN_SOCKET"] == "/run/podman/podman.sock"
    assert env["CHECKPOINTER_SPOOL_DIR"] == "/var/lib/checkpointer/spool"
    assert env["CHECKPOINTER_NSENTER_TARGET"] == "1"
    # Integers stay integers: helm would print 16777216 as 1.6777216e+07 without the int64 cast.
    assert env["CHECKPOINTER_PART_SIZE"] == "16777216"
    assert env["CHECKPOINTER_UPLOAD_CONCURRENCY"] == "4"
    assert env["CHECKPOINTER_UPLOAD_BYTES_PER_SECOND"] == "0"

    # Host paths are mounted at the same path, so what the agent hands the host's podman exists there.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in agent["volumeMounts"]}
    assert volumes["state"]["hostPath"] == {"path": "/var/lib/checkpointer", "type": "DirectoryOrCreate"}
    assert mounts["state"] == "/var/lib/checkpointer"
    assert volumes["podman-socket"]["hostPath"]["path"] == "/run/podman"
    assert mounts["podman-socket"] == "/run/podman"
    # The node's CRI runtime (containerd by default), read-only, for Pods' containers.
    assert env["CHECKPOINTER_CRI_SOCKET"] == "/run/containerd/containerd.sock"
    assert volumes["cri-socket"]["hostPath"] == {"path": "/run/containerd", "type": "DirectoryOrCreate"}
    [cri] = [m for m in agent["volumeMounts"] if m["name"] == "cri-socket"]
    assert cri == {"name": "cri-socket", "mountPath": "/run/containerd", "readOnly": True}


def test_values_reach_the_agent(helm: Helm) -> None:
    objects = helm.render(
        {
            "image": {"repository": "registry.example.com/checkpointer", "tag": "dev", "pullPolicy": "Always"},
            "podman": {"mode": "cli", "socketPath": "/run/user/0/podman/podman.sock"},
            "cri": {"socketPath": "/var/run/crio/crio.sock"},
            "upload": {"partSize": 64 * 1024 * 1024, "concurrency": 8, "bytesPerSecond": 100_000_000},
            "agent": {
                "stateDir": "/srv/checkpointer",
                "spoolDir": "/srv/checkpointer/spool",
                "tolerations": [],
                "nodeSelector": {"checkpointer.dev/agent": "true"},
            },
            "verbose": True,
        }
    )
    pod = find(objects, "DaemonSet")["spec"]["template"]["spec"]
    [agent] = pod["containers"]
    assert agent["image"] == "registry.example.com/checkpointer:dev"
    assert agent["imagePullPolicy"] == "Always"
    assert agent["args"] == ["agent", "--verbose"]
    env = env_of(agent)
    assert env["CHECKPOINTER_PODMAN_MODE"] == "cli"
    assert env["CHECKPOINTER_PART_SIZE"] == str(64 * 1024 * 1024)
    assert env["CHECKPOINTER_UPLOAD_CONCURRENCY"] == "8"
    assert env["CHECKPOINTER_UPLOAD_BYTES_PER_SECOND"] == "100000000"
    assert env["CHECKPOINTER_SPOOL_DIR"] == "/srv/checkpointer/spool"
    assert env["CHECKPOINTER_CRI_SOCKET"] == "/var/run/crio/crio.sock"
    # The CLI runs the host's podman through nsenter: no socket to mount; CRI-O's socket's directory is.
    assert {v["name"] for v in pod["volumes"]} == {"state", "tmp", "cri-socket"}
    assert {m["name"]: m["mountPath"] for m in agent["volumeMounts"]}["cri-socket"] == "/var/run/crio"
    # Without a CRI socket the agent checkpoints podman's containers only, and mounts nothing of it.
    without = find(helm.render({"cri": {"socketPath": ""}}), "DaemonSet")["spec"]["template"]["spec"]
    assert "cri-socket" not in {v["name"] for v in without["volumes"]}
    assert "CHECKPOINTER_CRI_SOCKET" not in env_of(without["containers"][0])
    assert {m["name"]: m["mountPath"] for m in agent["volumeMounts"]}["state"] == "/srv/checkpointer"
    assert "tolerations" not in pod
    assert pod["nodeSelector"] == {"checkpointer.dev/agent": "true"}


def test_host_network_listens_on_the_pod_ip_and_each_component_on_its_port(helm: Helm) -> None:
    objects = helm.render(
        {
            "controller": {"hostNetwork": True, "healthPort": 8081, "metricsPort": 9091},
            "agent": {"hostNetwork": True},
            "healthPort": 9000,
        }
    )
    for kind, port, metrics in (("Deployment", 8081, 9091), ("DaemonSet", 9000, 9090)):
        pod = find(objects, kind)["spec"]["template"]["spec"]
        [container] = pod["containers"]
        assert (pod["hostNetwork"], pod["dnsPolicy"]) == (True, "ClusterFirstWithHostNet")
        env = env_of(container)
        assert env["CHECKPOINTER_HEALTH_HOST"] == {"fieldRef": {"fieldPath": "status.podIP"}}
        assert env["CHECKPOINTER_HEALTH_PORT"] == str(port)
        assert env["CHECKPOINTER_METRICS_HOST"] == {"fieldRef": {"fieldPath": "status.podIP"}}
        assert env["CHECKPOINTER_METRICS_PORT"] == str(metrics)
        assert container["ports"] == [
            {"name": "health", "containerPort": port},
            {"name": "metrics", "containerPort": metrics},
        ]
    for kind in ("Deployment", "DaemonSet"):
        pod = find(helm.render({}), kind)["spec"]["template"]["spec"]
        env = env_of(pod["containers"][0])
        assert "hostNetwork" not in pod and "CHECKPOINTER_HEALTH_HOST" not in env
        assert "CHECKPOINTER_METRICS_HOST" not in env


METRICS_ALL = {
    "metrics": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus"}},
        "prometheusRule": {"enabled": True, "failureThreshold": 5, "runbookURL": "https://docs.example/metrics.md"},
        "dashboard": {"enabled": True},
    },
    "logFormat": "json",
}


@pytest.mark.parametrize("values", [METRICS_ALL, {"metrics": {"enabled": False}}], ids=["all", "off"])
def test_metrics_options_lint_clean(helm: Helm, values: dict[str, Any]) -> None:
    out = helm(
        "lint", "--strict", "--kube-version", kubernetes_version(), str(CHART), "--values", helm.values_file(values)
    )
    assert "1 chart(s) linted, 0 chart(s) failed" in out and "[WARNING]" not in out, out


def test_metrics_services_monitors_rules_and_dashboard_render(helm: Helm) -> None:
    objects = helm.render(METRICS_ALL)
    for component in ("controller", "agent"):
        service = find(objects, "Service", f"checkpointer-{component}-metrics")
        assert service["spec"]["selector"]["app.kubernetes.io/component"] == component
        assert service["spec"]["ports"] == [{"name": "metrics", "port": 9090, "targetPort": "metrics"}]
        monitor = find(objects, "ServiceMonitor", f"checkpointer-{component}-metrics")
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus"
        assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}]
        selected = monitor["spec"]["selector"]["matchLabels"]
        assert selected["checkpointer.dev/metrics"] == service["metadata"]["labels"]["checkpointer.dev/metrics"]
        assert selected["app.kubernetes.io/component"] == component
    [group] = find(objects, "PrometheusRule")["spec"]["groups"]
    alerts = {r["alert"]: r for r in group["rules"]}
    assert set(alerts) == {
        "CheckpointerCheckpointsFailing",
        "CheckpointerRestoresFailing",
        "CheckpointerStorageUnavailable",
        "CheckpointerSpoolNearlyFull",
        "CheckpointerAgentDown",
    }
    assert alerts["CheckpointerCheckpointsFailing"]["expr"].endswith(">= 5")
    for rule in alerts.values():
        assert {"summary", "description", "runbook_url"} <= set(rule["annotations"])
        assert rule["annotations"]["runbook_url"].startswith("https://docs.example/metrics.md#")
        assert "{{ $labels." in rule["annotations"]["summary"], "Prometheus' own templating survives Helm's"
    dashboard = find(objects, "ConfigMap", "checkpointer-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    panels = json.loads(dashboard["data"]["checkpointer.json"])["panels"]
    assert any("checkpointer_checkpoints_total" in t["expr"] for p in panels for t in p["targets"])
    for kind in ("Deployment", "DaemonSet"):
        assert (
            env_of(find(objects, kind)["spec"]["template"]["spec"]["containers"][0])["CHECKPOINTER_LOG_FORMAT"]
            == "json"
        )


def test_metrics_off_serves_nothing_and_renders_no_metrics_objects(helm: Helm) -> None:
    objects = helm.render({"metrics": {"enabled": False, "prometheusRule": {"enabled": True}}})
    assert not [o for o in objects if o["kind"] in ("Service", "ServiceMonitor", "PrometheusRule")]
    for kind in ("Deployment", "DaemonSet"):
        [container] = find(objects, kind)["spec"]["template"]["spec"]["containers"]
        assert env_of(container)["CHECKPOINTER_METRICS_PORT"] == "0"
        assert [p["name"] for p in container["ports"]] == ["health"]


def test_admin_namespaces_reach_controller_and_agent_as_a_json_list(helm: Helm) -> None:
    def admins(objects: Objects) -> set[str]:
        pods = [find(objects, kind)["spec"]["template"]["spec"] for kind in ("Deployment", "DaemonSet")]
        return {env_of(pod["containers"][0])["CHECKPOINTER_ADMIN_NAMESPACES"] for pod in pods}

    # Empty: the release namespace alone, written out so that both read the same list.
    assert admins(helm.render()) == {json.dumps([NAMESPACE])}
    chosen = helm.render({"tenancy": {"adminNamespaces": ["ops", "platform"]}})
    assert {tuple(json.loads(value)) for value in admins(chosen)} == {("ops", "platform")}
    assert "adminNamespaces" in helm.refusal({"tenancy": {"adminNamespaces": ["Not_A_Namespace"]}})


def test_agent_admission_policy_confines_the_agent_account_to_its_node(helm: Helm) -> None:
    objects = [o for o in yaml.safe_load_all(helm.template(namespace="ops")) if o]
    policy = find(objects, "ValidatingAdmissionPolicy", "checkpointer-agent-own-node")
    binding = find(objects, "ValidatingAdmissionPolicyBinding", "checkpointer-agent-own-node")
    assert binding["spec"] == {"policyName": "checkpointer-agent-own-node", "validationActions": ["Deny"]}
    spec = policy["spec"]
    assert spec["failurePolicy"] == "Fail"
    # Only the agent's account, named in the release's namespace, and every write of the three kinds.
    assert spec["matchConditions"] == [
        {"name": "agent", "expression": "request.userInfo.username == 'system:serviceaccount:ops:checkpointer-agent'"}
    ]
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): r for r in spec["matchConstraints"]["resourceRules"]}
    assert set(rules) == {
        (
            ("checkpointer.dev",),
            (
                "containercheckpoints",
                "containercheckpoints/status",
                "containerrestores",
                "containerrestores/status",
            ),
        ),
        (("coordination.k8s.io",), ("leases",)),
    }
    assert all(r["operations"] == ["CREATE", "UPDATE"] for r in rules.values())
    # The node is the token's, the label is on the old and the new object, the Lease in the release namespace.
    variables = {v["name"]: v["expression"] for v in spec["variables"]}
    assert "request.userInfo.extra['authentication.kubernetes.io/node-name']" in variables["nodeClaim"]
    assert "object.metadata.labels['checkpointer.dev/node']" in variables["newNode"]
    assert "oldObject.metadata.labels['checkpointer.dev/node']" in variables["oldNode"]
    [claim, lease, label, spec_node] = spec["validations"]
    assert claim["expression"] == "variables.node != ''"
    assert "request.namespace == 'ops'" in lease["expression"]
    assert "'checkpointer-agent-' + variables.node" in lease["expression"]
    assert "variables.oldNode == variables.node" in label["expression"]
    # spec.nodeName too: a label a tenant changed never makes an object another node's.
    assert "object.spec.nodeName" in variables["specNode"]
    assert "variables.specNode == variables.node" in spec_node["expression"]
    # 403 with a sentence, not 422.
    assert all(v["reason"] == "Forbidden" and v["messageExpression"] for v in spec["validations"])
    assert "names none" in claim["messageExpression"]

    off = helm.render({"agent": {"nodeAdmissionPolicy": False}})
    assert not [o for o in off if o["kind"].startswith("ValidatingAdmissionPolicy")]


def test_storage_values_render_storage_secret_and_access_to_only_that_secret(helm: Helm) -> None:
    objects = helm.render(STORAGE_VALUES)
    storage = find(objects, "CheckpointStorage", "default")
    assert "namespace" not in storage["metadata"]
    assert storage["spec"] == {
        "bucket": "checkpoints",
        "endpoint": f"http://127.0.0.1:{S3_PORT}",
        "region": "us-east-1",
        "prefix": "cluster-a",
        "forcePathStyle": True,
        "default": True,
        "deletionPolicy": "Delete",
        "credentialsSecretRef": {"namespace": NAMESPACE, "name": STORAGE_SECRET},
    }
    secret = find(objects, "Secret", STORAGE_SECRET)
    assert {k: base64.b64decode(v).decode() for k, v in secret["data"].items()} == {
        "accessKeyID": "AKIDCHART",
        "secretAccessKey": "chart-secret-key",
    }
    role = find(objects, "Role", "checkpointer-storage-credentials")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [STORAGE_SECRET], "verbs": ["get"]}
    ]
    binding = find(objects, "RoleBinding", "checkpointer-storage-credentials")
    assert {s["name"] for s in binding["subjects"]} == {CONTROLLER_SA, AGENT_SA}

    # An existing Secret: nothing to create, and access to that one.
    objects = helm.render(
        {"storage": {"create": True, "bucket": "b", "existingSecret": "mine"}},
        "--set",
        "rbac.storageSecrets[0].namespace=elsewhere,rbac.storageSecrets[0].name=theirs",
    )
    assert not [o for o in objects if o["kind"] == "Secret"]
    assert find(objects, "CheckpointStorage")["spec"]["credentialsSecretRef"] == {
        "namespace": NAMESPACE,
        "name": "mine",
    }
    roles = {
        o["metadata"]["namespace"]: o for o in objects if o["kind"] == "Role" and "storage" in o["metadata"]["name"]
    }
    assert roles[NAMESPACE]["rules"][0]["resourceNames"] == ["mine"]
    assert roles["elsewhere"]["rules"][0]["resourceNames"] == ["theirs"]

    # No credentials: the environment's; no Secret and no access to any.
    objects = helm.render({"storage": {"create": True, "bucket": "b"}})
    assert "credentialsSecretRef" not in find(objects, "CheckpointStorage")["spec"]
    assert not [o for o in objects if o["kind"] in ("Secret",) or "storage" in o["metadata"]["name"]]


def test_storage_encryption_secret_is_referenced_and_granted(helm: Helm) -> None:
    objects = helm.render(
        {"storage": {"create": True, "bucket": "b", "existingSecret": "mine", "encryptionSecret": "age"}}
    )
    assert find(objects, "CheckpointStorage")["spec"]["encryption"] == {
        "secretRef": {"namespace": NAMESPACE, "name": "age"}
    }
    role = find(objects, "Role", "checkpointer-storage-credentials")
    assert role["rules"][0]["resourceNames"] == ["age", "mine"]
    assert "encryption" not in find(helm.render(STORAGE_VALUES), "CheckpointStorage")["spec"]
    capped = find(helm.render({"download": {"maxArchiveBytes": 1 << 34}}), "DaemonSet")
    [agent] = capped["spec"]["template"]["spec"]["containers"]
    assert env_of(agent)["CHECKPOINTER_MAX_ARCHIVE_BYTES"] == str(1 << 34)


def test_bad_values_are_refused_with_a_reason(helm: Helm) -> None:
    assert "podman/mode" in helm.refusal({"podman": {"mode": "socket"}})
    assert "cri/socketPath" in helm.refusal({"cri": {"socketPath": "run/containerd/containerd.sock"}})
    assert "acessKeyID" in helm.refusal({"storage": {"acessKeyID": "typo"}})
    assert "storage.create needs storage.bucket" in helm.refusal({"storage": {"create": True}})
    assert "must be inside agent.stateDir" in helm.refusal({"agent": {"spoolDir": "/var/spool/checkpointer"}})
    assert "set both storage.accessKeyID and storage.secretAccessKey" in helm.refusal(
        {"storage": {"create": True, "bucket": "b", "accessKeyID": "only-half"}}
    )


def test_rendered_rbac_grants_no_wildcards_and_no_secret_beyond_named_ones(helm: Helm) -> None:
    objects = helm.render(STORAGE_VALUES)
    for role in (o for o in objects if o["kind"] in ("Role", "ClusterRole")):
        name = role["metadata"]["name"]
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], f"{role['kind']} {name}: {rule}"
            # The controller deletes finished objects once their TTL has passed (docs/api.md); nothing
            # else of the operator deletes.
            expiring = {"containercheckpoints", "containerrestores", "containermigrations"}
            expires = name == "checkpointer-controller" and set(rule["resources"]) <= expiring
            assert "delete" not in rule["verbs"] or name == "checkpointer-edit" or expires, f"{name}: {rule}"
            if "checkpointer.dev" in rule["apiGroups"] and name != "checkpointer-edit":
                # The operator patches; it never creates or replaces the API's objects.
                allowed = {"get", "list", "watch", "patch"} | ({"delete"} if expires else set())
                # CheckpointSchedules create their ContainerCheckpoints (or ContainerMigrations), and
                # ContainerMigrations their checkpoint and restores, which they own (docs/api.md).
                made = {"containercheckpoints", "containerrestores", "containermigrations"}
                if name == "checkpointer-controller" and set(rule["resources"]) <= made:
                    allowed.add("create")
                owners = {"checkpointschedules/finalizers", "containermigrations/finalizers"}
                if name == "checkpointer-controller" and set(rule["resources"]) <= owners:
                    allowed = {"update"}
                assert set(rule["verbs"]) <= allowed, f"{name}: {rule}"
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), f"{name}: {rule}"
            if "secrets" in rule["resources"]:
                assert role["kind"] == "Role", "Secrets are never granted cluster-wide"
                if rule["verbs"] == ["create"]:  # its signing key's Secret: create cannot be limited to a name
                    assert name == "checkpointer-controller" and "resourceNames" not in rule, rule
                else:
                    assert rule["verbs"] == ["get"] and rule["resourceNames"], rule
    agent = find(objects, "ClusterRole", "checkpointer-agent")
    assert {v for r in agent["rules"] for v in r["verbs"]} <= {"get", "list", "watch", "patch", "create"}
    assert [r for r in agent["rules"] if "create" in r["verbs"]] == [
        {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]}
    ]


# --- a real API server ---------------------------------------------------------------------------


def _apply_dry_run(cp: ControlPlane, manifest: str) -> None:
    def accepted() -> bool:
        # kubectl's discovery may lag a new CRD for a moment.
        return cp.kubectl("apply", "--dry-run=server", "-f", "-", input=manifest, check=False).returncode == 0

    if not accepted():
        until("the API server accepts the rendered chart", accepted, timeout=30)
    out = cp.kubectl("apply", "--dry-run=server", "-f", "-", input=manifest)
    assert "(server dry run)" in out.stdout


@pytest.mark.parametrize("values", [{}, STORAGE_VALUES], ids=["defaults", "storage"])
def test_rendered_chart_passes_server_side_dry_run(
    cp: ControlPlane, helm: Helm, installed: str, values: dict[str, Any]
) -> None:
    namespace = "dry-run"
    if cp.kubectl("get", "namespace", namespace, check=False).returncode != 0:
        cp.kubectl("create", "namespace", namespace)
    storage = {"storage": {**values["storage"], "name": "dry-run"}} if values else {}
    manifest = helm.template(storage, "--set", "fullnameOverride=dry-run", namespace=namespace)
    _apply_dry_run(cp, manifest)
    # A dry run creates nothing.
    assert cp.kubectl("get", "deployment", "-n", namespace, "-o", "name").stdout.strip() == ""


def test_install_creates_the_release_and_its_notes_examples_are_valid(cp: ControlPlane, installed: str) -> None:
    deployment = json.loads(
        cp.kubectl("get", "deployment", "checkpointer-controller", "-n", NAMESPACE, "-o", "json").stdout
    )
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    cp.kubectl("get", "daemonset", "checkpointer-agent", "-n", NAMESPACE)
    cp.kubectl("get", "checkpointstorage", "default")
    # helm installed the CRDs from the chart's crds/ before the templates that use them.
    for path in sorted((CHART / "crds").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())["metadata"]["name"]
        cp.kubectl("wait", "--for=condition=Established", "--timeout=10s", f"crd/{crd}")

    notes = installed.split("NOTES:", 1)[1]
    examples = re.findall(r"kubectl apply -f - <<'EOF'\n(.*?)\nEOF\n", notes, re.DOTALL)
    assert [yaml.safe_load(e)["kind"] for e in examples] == ["ContainerCheckpoint", "ContainerRestore"]
    for example in examples:
        out = cp.kubectl("apply", "--dry-run=server", "-f", "-", input=example)
        assert "(server dry run)" in out.stdout


def can(
    cp: ControlPlane, kubeconfig: Path, verb: str, resource: str, namespace: str | None = None, *extra: str
) -> bool:
    args = ["auth", "can-i", verb, resource, *extra]
    args += ["--namespace", namespace] if namespace else []
    out = cp.kubectl(*args, kubeconfig=kubeconfig, check=False)
    answer = out.stdout.strip()
    assert answer in ("yes", "no"), out.stderr
    return answer == "yes"


CCP = "containercheckpoints.checkpointer.dev"
CRST = "containerrestores.checkpointer.dev"
CKS = "checkpointstorages.checkpointer.dev"
LEASES = "leases.coordination.k8s.io"
SIGNING_KEY = "checkpointer-signing-key"
SIGNING_PUBLIC_KEY = "checkpointer-signing-public-key"


def test_agent_has_least_privilege(cp: ControlPlane, installed: str) -> None:
    agent = cp.kubeconfig_for_serviceaccount(NAMESPACE, AGENT_SA)
    cp.kubectl("create", "secret", "generic", "unrelated", "-n", NAMESPACE, "--from-literal=k=v")

    def ok(verb: str, resource: str, namespace: str | None = None, *extra: str) -> bool:
        return can(cp, agent, verb, resource, namespace, *extra)

    # What it needs.
    for plural in (CCP, CRST):
        for verb in ("get", "list", "watch", "patch"):
            assert ok(verb, plural, WORKLOADS), f"{verb} {plural}"
        assert ok("patch", plural, WORKLOADS, "--subresource=status")
    assert ok("get", CKS) and ok("list", CKS)
    assert ok("get", f"secrets/{STORAGE_SECRET}", NAMESPACE)
    for verb in ("get", "create", "update", "patch"):
        assert ok(verb, LEASES, NAMESPACE), verb
    assert ok("create", "events", WORKLOADS)

    # What it must not do.
    for verb in ("create", "delete", "deletecollection", "update"):
        assert not ok(verb, CCP, WORKLOADS), f"{verb} {CCP}"
        assert not ok(verb, CRST, WORKLOADS), f"{verb} {CRST}"
    assert not ok("update", CCP, WORKLOADS, "--subresource=status")
    assert not ok("patch", CKS) and not ok("patch", CKS, None, "--subresource=status")
    assert not ok("get", "secrets/unrelated", NAMESPACE)
    assert not ok("list", "secrets", NAMESPACE)
    assert not ok("watch", "secrets", NAMESPACE)
    assert not ok("get", f"secrets/{STORAGE_SECRET}", "default")
    assert not ok("list", "secrets", None, "--all-namespaces")
    assert not ok("patch", LEASES, "default")
    assert not ok("create", LEASES, "default")
    assert not ok("delete", LEASES, NAMESPACE)
    assert not ok("list", LEASES, NAMESPACE)
    assert not ok("get", "nodes")
    assert not ok("list", "pods", NAMESPACE)
    # The signing key's public half, and nothing of its Secret.
    assert ok("get", f"configmaps/{SIGNING_PUBLIC_KEY}", NAMESPACE)
    assert not ok("patch", f"configmaps/{SIGNING_PUBLIC_KEY}", NAMESPACE)
    assert not ok("get", "configmaps/unrelated", NAMESPACE) and not ok("list", "configmaps", NAMESPACE)
    assert not ok("get", f"secrets/{SIGNING_KEY}", NAMESPACE)

    # And the API server agrees when it is done for real.
    forbidden = cp.kubectl("get", "secrets", "-n", NAMESPACE, kubeconfig=agent, check=False)
    assert "Forbidden" in forbidden.stderr
    secret = json.loads(
        cp.kubectl("get", "secret", STORAGE_SECRET, "-n", NAMESPACE, "-o", "json", kubeconfig=agent).stdout
    )
    assert base64.b64decode(secret["data"]["accessKeyID"]).decode() == "AKIDCHART"
    assert (
        "Forbidden" in cp.kubectl("get", "secret", "unrelated", "-n", NAMESPACE, kubeconfig=agent, check=False).stderr
    )


def test_controller_has_least_privilege(cp: ControlPlane, installed: str) -> None:
    controller = cp.kubeconfig_for_serviceaccount(NAMESPACE, CONTROLLER_SA)

    def ok(verb: str, resource: str, namespace: str | None = None, *extra: str) -> bool:
        return can(cp, controller, verb, resource, namespace, *extra)

    for plural in (CCP, CRST):
        for verb in ("get", "list", "watch", "patch"):
            assert ok(verb, plural, WORKLOADS), f"{verb} {plural}"
        assert ok("patch", plural, WORKLOADS, "--subresource=status")
        assert ok("delete", plural, WORKLOADS)  # once their TTL has passed (docs/api.md)
        # A CheckpointSchedule's runs are ContainerCheckpoints, and a ContainerMigration's checkpoint
        # and restores, that the controller creates (docs/api.md).
        assert ok("create", plural, WORKLOADS), f"create {plural}"
    migrations = "containermigrations.checkpointer.dev"
    for verb in ("get", "list", "watch", "create", "delete"):
        assert ok(verb, migrations, WORKLOADS), verb
    assert ok("patch", migrations, WORKLOADS, "--subresource=status")
    # What it owns carries blockOwnerDeletion: update on its finalizers, and no other change to it.
    assert ok("update", migrations, WORKLOADS, "--subresource=finalizers")
    assert not ok("patch", migrations, WORKLOADS) and not ok("update", migrations, WORKLOADS)
    schedules = "checkpointschedules.checkpointer.dev"
    for verb in ("get", "list", "watch"):
        assert ok(verb, schedules, WORKLOADS), verb
    assert ok("patch", schedules, WORKLOADS, "--subresource=status")
    assert not ok("patch", schedules, WORKLOADS) and not ok("create", schedules, WORKLOADS)
    assert ok("watch", "nodes")  # a schedule's onNodeCordon
    for verb in ("get", "list", "watch", "patch"):
        assert ok(verb, CKS), verb
    assert ok("patch", CKS, None, "--subresource=status")
    assert not ok("delete", CKS) and not ok("create", CKS)
    assert ok("get", "nodes") and not ok("patch", "nodes")
    assert ok("get", LEASES, NAMESPACE)
    assert not ok("patch", LEASES, NAMESPACE) and not ok("get", LEASES, "default")
    # Its own Lease, for the leader election: changes only to that one, nowhere else.
    for verb in ("get", "update", "patch"):
        assert ok(verb, f"{LEASES}/checkpointer-controller", NAMESPACE), verb
    for verb in ("update", "patch"):
        assert not ok(verb, f"{LEASES}/checkpointer-agent-{NODE}", NAMESPACE), verb
    assert ok("create", LEASES, NAMESPACE) and not ok("create", LEASES, "default")
    assert not ok("delete", f"{LEASES}/checkpointer-controller", NAMESPACE)
    assert ok("get", f"secrets/{STORAGE_SECRET}", NAMESPACE)
    assert not ok("get", "secrets/unrelated", NAMESPACE) and not ok("list", "secrets", NAMESPACE)
    assert ok("create", "events", WORKLOADS)
    # Its signing key: created on first start, then read; the public key published and updated.
    assert ok("create", "secrets", NAMESPACE) and ok("get", f"secrets/{SIGNING_KEY}", NAMESPACE)
    assert not ok("create", "secrets", WORKLOADS) and not ok("patch", f"secrets/{SIGNING_KEY}", NAMESPACE)
    for verb in ("get", "patch"):
        assert ok(verb, f"configmaps/{SIGNING_PUBLIC_KEY}", NAMESPACE), verb
    assert not ok("get", "configmaps/unrelated", NAMESPACE)

    # Finalizers are metadata: adding and removing one is a patch of the object itself.
    example = {
        "apiVersion": "checkpointer.dev/v1alpha1",
        "kind": "ContainerCheckpoint",
        "metadata": {"name": "finalized", "namespace": WORKLOADS},
        "spec": {"nodeName": NODE, "containers": ["app"]},
    }
    cp.kubectl("apply", "-f", "-", input=json.dumps(example))
    for finalizers in (["controller.checkpointer.dev/finalizer"], []):
        patch = json.dumps({"metadata": {"finalizers": finalizers}})
        cp.kubectl("patch", CCP, "finalized", "-n", WORKLOADS, "--type=merge", "-p", patch, kubeconfig=controller)
        got = cp.kubectl("get", CCP, "finalized", "-n", WORKLOADS, "-o", "jsonpath={.metadata.finalizers}").stdout
        assert json.loads(got or "[]") == finalizers
    # Deleting is allowed: expired TTLs and a schedule's retention (docs/api.md).
    deleted = cp.kubectl("delete", CCP, "finalized", "-n", WORKLOADS, kubeconfig=controller, check=False)
    assert deleted.returncode == 0, deleted.stderr


def test_namespace_editors_can_checkpoint_through_aggregated_roles(cp: ControlPlane, installed: str) -> None:
    user = cp.kubeconfig_for_user("dana", ["team-devs"])
    cp.kubectl("create", "rolebinding", "devs-edit", "--clusterrole=edit", "--group=team-devs", "-n", WORKLOADS)
    until(
        "the edit role (aggregated) lets a namespace editor create ContainerCheckpoints",
        lambda: can(cp, user, "create", CCP, WORKLOADS),
        timeout=60,
    )
    assert can(cp, user, "delete", CRST, WORKLOADS)
    assert can(cp, user, "create", "containermigrations.checkpointer.dev", WORKLOADS)
    assert not can(cp, user, "patch", "containermigrations.checkpointer.dev", WORKLOADS, "--subresource=status")
    assert not can(cp, user, "patch", CCP, WORKLOADS, "--subresource=status")
    assert not can(cp, user, "create", CCP, "default")


def test_operator_runs_with_only_the_charts_permissions(
    cp: ControlPlane, helm: Helm, installed: str, tmp_path: Path
) -> None:
    """The real controller and agent, each with its ServiceAccount's token: no request is Forbidden.

    The agent's token is bound to a Pod of the chart's DaemonSet on its node, as the kubelet's is: the
    chart's admission policy refuses the agent's writes with a token that names no node.
    """
    base = {k: v for k, v in os.environ.items() if not k.startswith("CHECKPOINTER_") and k != "KUBECONFIG"}
    base |= {"CHECKPOINTER_NAMESPACE": NAMESPACE, "PYTHONUNBUFFERED": "1"}
    pod = agent_pod(helm.render(STORAGE_VALUES), NODE)
    cp.kubectl("apply", "-f", "-", input=json.dumps(pod))
    agent_kubeconfig = cp.kubeconfig_for_serviceaccount(NAMESPACE, AGENT_SA, pod=pod["metadata"]["name"])

    # The adapter calls the agent makes, as the agent: storages, the storage's Secret, its Lease.
    probe = f"""
import json
from checkpointer.adapters.kube import Kube, load_config
load_config()
kube = Kube(connections=1)
storage = kube.storage("default")
credentials = kube.credentials(storage)
kube.renew_lease("{NAMESPACE}", "checkpointer-agent-{NODE}", "probe", 20)
kube.renew_lease("{NAMESPACE}", "checkpointer-agent-{NODE}", "probe", 20)
print(json.dumps({{"storages": [s.metadata.name for s in kube.storages()], "key": credentials.access_key_id}}))
"""
    out = run([sys.executable, "-c", probe], env=base | {"KUBECONFIG": str(agent_kubeconfig)}, timeout=60)
    assert json.loads(out.stdout) == {"storages": ["default"], "key": "AKIDCHART"}
    holder = cp.kubectl(
        "get", LEASES, f"checkpointer-agent-{NODE}", "-n", NAMESPACE, "-o", "jsonpath={.spec.holderIdentity}"
    )
    assert holder.stdout == "probe"

    supervisor = Supervisor(tmp_path / "logs")
    try:
        controller = supervisor.start(
            "controller",
            [sys.executable, "-m", "checkpointer", "controller"],
            env=base
            | {
                "KUBECONFIG": str(cp.kubeconfig_for_serviceaccount(NAMESPACE, CONTROLLER_SA)),
                "CHECKPOINTER_STORAGE_VALIDATION_SECONDS": "2",
                # Both run on this host: each serves its liveness endpoint on a port of its own.
                "CHECKPOINTER_HEALTH_PORT": str(free_port()),
                "CHECKPOINTER_METRICS_PORT": str(free_port()),
            },
        )
        # The agent's podman is a stand-in that knows no containers (entered with nsenter into this
        # process's own namespaces), so its checkpoint ends in Failed/ContainerNotFound.
        agent = supervisor.start(
            "agent",
            [sys.executable, "-m", "checkpointer", "agent"],
            env=base
            | {
                "KUBECONFIG": str(agent_kubeconfig),
                "CHECKPOINTER_NODE_NAME": NODE,
                "CHECKPOINTER_PODMAN_MODE": "cli",
                "CHECKPOINTER_NSENTER_TARGET": str(os.getpid()),
                "CHECKPOINTER_PODMAN_COMMAND": json.dumps(["sh", "-c", "echo []", "podman"]),
                "CHECKPOINTER_SPOOL_DIR": str(tmp_path / "spool"),
                "CHECKPOINTER_HEALTH_PORT": str(free_port()),
                "CHECKPOINTER_METRICS_PORT": str(free_port()),
            },
        )

        def logs() -> str:
            return "\n".join(
                f"--- {p.name} ---\n{p.log.read_text(errors='replace')[-4000:]}" for p in (controller, agent)
            )

        def get(*args: str) -> str:
            return cp.kubectl("get", *args, check=False).stdout

        until(
            "the agent renews its Lease",
            lambda: (
                get(LEASES, f"checkpointer-agent-{NODE}", "-n", NAMESPACE, "-o", "jsonpath={.spec.holderIdentity}")
                == NODE
            ),
            last=logs,
            timeout=60,
        )
        until(
            "the controller validates the chart's storage with its Secret",
            lambda: get(CKS, "default", "-o", "jsonpath={.status.phase}") == "Unavailable",
            last=logs,
            timeout=60,
        )
        message = get(CKS, "default", "-o", "jsonpath={.status.message}")
        assert "Forbidden" not in message and "403" not in message, message
        # It leads through its own Lease, written with nothing but the chart's Role.
        assert get(LEASES, "checkpointer-controller", "-n", NAMESPACE, "-o", "jsonpath={.spec.holderIdentity}")
        # Its signing key, made on its first start, and the public key the agents read.
        assert get("secret", SIGNING_KEY, "-n", NAMESPACE, "-o", "jsonpath={.data.ed25519\\.key}")
        assert "PUBLIC KEY" in get("configmap", SIGNING_PUBLIC_KEY, "-n", NAMESPACE, "-o", "jsonpath={.data}")

        ccp = {
            "apiVersion": "checkpointer.dev/v1alpha1",
            "kind": "ContainerCheckpoint",
            "metadata": {"name": "no-such-container", "namespace": WORKLOADS},
            "spec": {"nodeName": NODE, "containers": ["my-app"], "leaveRunning": True},
        }
        cp.kubectl("apply", "-f", "-", input=json.dumps(ccp))

        def status() -> dict[str, Any]:
            out = get(CCP, "no-such-container", "-n", WORKLOADS, "-o", "json")
            return json.loads(out) if out else {}

        # Scheduled by the controller (node label, finalizer), then failed by the agent (status).
        until(
            "the agent fails the checkpoint",
            lambda: status().get("status", {}).get("phase") == "Failed",
            last=logs,
            timeout=60,
        )
        obj = status()
        assert obj["metadata"]["labels"]["checkpointer.dev/node"] == NODE
        assert "controller.checkpointer.dev/finalizer" in obj["metadata"]["finalizers"]
        reasons = {c["type"]: c["reason"] for c in obj["status"]["conditions"]}
        assert "ContainerNotFound" in reasons.values(), obj["status"]
        events = get(
            "events", "-n", WORKLOADS, "--field-selector", "involvedObject.name=no-such-container", "-o", "json"
        )
        assert {e["reason"] for e in json.loads(events)["items"]} >= {"Scheduled"}, logs()

        # Deleting runs the controller's finalizer (no archives: nothing to delete in the bucket).
        cp.kubectl("delete", CCP, "no-such-container", "-n", WORKLOADS, "--timeout=60s")

        text = logs()
        for needle in ("forbidden", "not enough permissions"):
            assert needle not in text.lower(), text
        assert controller.alive() and agent.alive(), text
    finally:
        supervisor.stop_all()
