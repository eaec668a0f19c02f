"""The local control plane is a real one: versions, CEL admission, RBAC and the controllers."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from helpers import start_control_plane, until
from localenv.controlplane import ControlPlane, kubernetes_version

pytestmark = pytest.mark.e2e


def kubectl_apply(cp: ControlPlane, obj: dict[str, Any], **kwargs: Any) -> Any:
    return cp.kubectl("apply", "-f", "-", input=json.dumps(obj), **kwargs)


def test_client_and_server_report_the_built_version(cp: ControlPlane) -> None:
    versions = json.loads(cp.kubectl("version", "-o", "json").stdout)
    expected = kubernetes_version()
    assert expected.startswith("v1.")
    assert versions["clientVersion"]["gitVersion"] == expected
    assert versions["serverVersion"]["gitVersion"] == expected
    assert versions["serverVersion"]["minor"] == expected.split(".")[1]


WIDGET_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.localenv.checkpointer.dev"},
    "spec": {
        "group": "localenv.checkpointer.dev",
        "names": {"kind": "Widget", "plural": "widgets", "singular": "widget"},
        "scope": "Namespaced",
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["min", "max"],
                                "properties": {"min": {"type": "integer"}, "max": {"type": "integer"}},
                                "x-kubernetes-validations": [
                                    {"rule": "self.min <= self.max", "message": "min must not exceed max"}
                                ],
                            }
                        },
                    }
                },
            }
        ],
    },
}


def widget(name: str, lo: int, hi: int) -> dict[str, Any]:
    return {
        "apiVersion": "localenv.checkpointer.dev/v1",
        "kind": "Widget",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"min": lo, "max": hi},
    }


def test_crd_cel_rule_rejects_a_bad_object_with_its_message(cp: ControlPlane) -> None:
    kubectl_apply(cp, WIDGET_CRD)
    cp.kubectl("wait", "--for=condition=Established", "crd/widgets.localenv.checkpointer.dev", "--timeout=30s")
    # kubectl's discovery may lag the Established condition by a moment.
    until(
        "a valid Widget is accepted",
        lambda: kubectl_apply(cp, widget("good", 1, 2), check=False).returncode == 0,
        timeout=60,
    )

    bad = kubectl_apply(cp, widget("bad", 3, 2), check=False)
    assert bad.returncode != 0
    assert "min must not exceed max" in bad.stderr
    assert "Invalid" in bad.stderr
    assert cp.kubectl("get", "widget", "bad", "-n", "default", check=False).returncode != 0


def test_serviceaccount_is_forbidden_until_a_role_is_bound(cp: ControlPlane) -> None:
    cp.kubectl("create", "namespace", "sa-test")
    cp.kubectl("create", "serviceaccount", "reader", "-n", "sa-test")
    kubeconfig = cp.kubeconfig_for_serviceaccount("sa-test", "reader")

    whoami = json.loads(cp.kubectl("auth", "whoami", "-o", "json", kubeconfig=kubeconfig).stdout)
    assert whoami["status"]["userInfo"]["username"] == "system:serviceaccount:sa-test:reader"

    denied = cp.kubectl("get", "secrets", "-n", "sa-test", kubeconfig=kubeconfig, check=False)
    assert denied.returncode != 0
    assert "Forbidden" in denied.stderr
    assert 'User "system:serviceaccount:sa-test:reader" cannot list resource "secrets"' in denied.stderr

    cp.kubectl("create", "role", "secret-reader", "--verb=get,list", "--resource=secrets", "-n", "sa-test")
    cp.kubectl(
        "create",
        "rolebinding",
        "reader-reads-secrets",
        "--role=secret-reader",
        "--serviceaccount=sa-test:reader",
        "-n",
        "sa-test",
    )
    until(
        "the bound Role lets the ServiceAccount list secrets",
        lambda: cp.kubectl("get", "secrets", "-n", "sa-test", kubeconfig=kubeconfig, check=False).returncode == 0,
        timeout=60,
    )
    # Still nothing outside the Role's namespace.
    other = cp.kubectl("get", "secrets", "-n", "default", kubeconfig=kubeconfig, check=False)
    assert "Forbidden" in other.stderr


def test_client_certificate_user_is_forbidden_then_gets_aggregated_view(cp: ControlPlane) -> None:
    kubeconfig = cp.kubeconfig_for_user("alice", ["developers", "qa"])

    user = json.loads(cp.kubectl("auth", "whoami", "-o", "json", kubeconfig=kubeconfig).stdout)["status"]["userInfo"]
    assert user["username"] == "alice"
    assert {"developers", "qa", "system:authenticated"} <= set(user["groups"])

    denied = cp.kubectl("get", "configmaps", "-n", "default", kubeconfig=kubeconfig, check=False)
    assert denied.returncode != 0
    assert 'User "alice" cannot list resource "configmaps"' in denied.stderr

    # `view` has no rules of its own: the clusterrole-aggregation controller fills them in.
    cp.kubectl("create", "clusterrolebinding", "developers-view", "--clusterrole=view", "--group=developers")
    until(
        "the aggregated view ClusterRole lets the group list configmaps",
        lambda: cp.kubectl("get", "configmaps", "-n", "default", kubeconfig=kubeconfig, check=False).returncode == 0,
        timeout=60,
    )


def test_kubernetes_python_client_works_with_the_admin_kubeconfig(cp: ControlPlane) -> None:
    from kubernetes import client, config

    new_client: Any = config.new_client_from_config
    api = client.CoreV1Api(new_client(config_file=str(cp.kubeconfig)))
    namespaces: list[Any] = api.list_namespace().items
    names = {ns.metadata.name for ns in namespaces}
    assert {"default", "kube-system"} <= names


def test_namespace_deletion_completes(cp: ControlPlane) -> None:
    cp.kubectl("create", "namespace", "doomed")
    cp.kubectl("create", "configmap", "content", "-n", "doomed", "--from-literal=a=b")
    cp.kubectl("delete", "namespace", "doomed", "--timeout=60s")
    gone = cp.kubectl("get", "namespace", "doomed", check=False)
    assert gone.returncode != 0
    assert "NotFound" in gone.stderr


def test_garbage_collector_deletes_dependents(cp: ControlPlane) -> None:
    cp.kubectl("create", "configmap", "owner", "-n", "default")
    uid = cp.kubectl("get", "configmap", "owner", "-n", "default", "-o", "jsonpath={.metadata.uid}").stdout
    assert uid
    dependent = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "dependent",
            "namespace": "default",
            "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}],
        },
    }
    kubectl_apply(cp, dependent)
    cp.kubectl("delete", "configmap", "owner", "-n", "default")
    until(
        "the garbage collector deletes the dependent ConfigMap",
        lambda: cp.kubectl("get", "configmap", "dependent", "-n", "default", check=False).returncode != 0,
        timeout=60,
    )


def test_stop_ends_every_process(tmp_path: Path) -> None:
    plane, supervisor = start_control_plane(tmp_path)
    try:
        pids = [p.popen.pid for p in supervisor.processes]
        assert len(pids) == 3
        plane.stop()
        assert supervisor.processes == []
        for pid in pids:
            # Each component leads its own process group: nothing of any group may remain.
            with pytest.raises(ProcessLookupError):
                os.killpg(pid, 0)
    finally:
        plane.stop()
        supervisor.stop_all()
