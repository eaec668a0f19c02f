"""The tests' in-process client of the API server (hack/localenv/api.py) takes a resource for what
kubectl takes it for, and builds the paths kubectl would ask."""

from __future__ import annotations

import ssl
from typing import Any

import pytest

from localenv.api import Api, ApiError, Resource

DISCOVERY: dict[str, Any] = {
    "/apis": {
        "groups": [
            {"preferredVersion": {"groupVersion": "events.k8s.io/v1"}},
            {"preferredVersion": {"groupVersion": "coordination.k8s.io/v1"}},
            {"preferredVersion": {"groupVersion": "checkpointer.dev/v1alpha1"}},
        ]
    },
    "/api/v1": {
        "resources": [
            {"name": "events", "singularName": "event", "kind": "Event", "namespaced": True, "shortNames": ["ev"]},
            {"name": "nodes", "singularName": "node", "kind": "Node", "namespaced": False, "shortNames": ["no"]},
            {"name": "pods/log", "singularName": "", "kind": "Pod", "namespaced": True},
        ]
    },
    "/apis/events.k8s.io/v1": {
        "resources": [{"name": "events", "singularName": "event", "kind": "Event", "namespaced": True}]
    },
    "/apis/coordination.k8s.io/v1": {
        "resources": [{"name": "leases", "singularName": "lease", "kind": "Lease", "namespaced": True}]
    },
    "/apis/checkpointer.dev/v1alpha1": {
        "resources": [
            {
                "name": "containercheckpoints",
                "singularName": "containercheckpoint",
                "kind": "ContainerCheckpoint",
                "namespaced": True,
                "shortNames": ["ccp"],
            },
            {
                "name": "checkpointstorages",
                "singularName": "checkpointstorage",
                "kind": "CheckpointStorage",
                "namespaced": False,
                "shortNames": ["cks"],
            },
        ]
    },
}


class Discovered(Api):
    """An Api whose server answers discovery from DISCOVERY, and counts how often it was asked."""

    def __init__(self) -> None:
        super().__init__("https://127.0.0.1:6443", ssl.create_default_context())
        self.asked = 0

    def _checked(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        self.asked += 1
        return DISCOVERY[path]


CCP = Resource("checkpointer.dev/v1alpha1", "containercheckpoints", "ContainerCheckpoint", True)
CKS = Resource("checkpointer.dev/v1alpha1", "checkpointstorages", "CheckpointStorage", False)


@pytest.mark.parametrize(
    "name",
    [
        "ccp",
        "containercheckpoints",
        "containercheckpoint",
        "ContainerCheckpoint",
        "containercheckpoints.checkpointer.dev",
    ],
)
def test_every_name_kubectl_takes_for_a_resource_is_taken_for_it(name: str) -> None:
    assert Discovered().resource(name) == CCP


def test_the_core_group_wins_a_name_two_groups_have_as_with_kubectl() -> None:
    api = Discovered()
    assert api.resource("events").group_version == "v1"
    assert api.resource("events.events.k8s.io").group_version == "events.k8s.io/v1"
    assert api.resource("Lease.coordination.k8s.io").plural == "leases"


def test_subresources_are_no_resources_and_an_unknown_name_is_not_found() -> None:
    api = Discovered()
    with pytest.raises(ApiError, match='resource type "pods/log"'):
        api.resource("pods/log")
    with pytest.raises(ApiError, match='resource type "widgets"'):
        api.resource("widgets")


def test_discovery_is_asked_once_for_the_names_it_knows() -> None:
    api = Discovered()
    api.resource("ccp")
    asked = api.asked
    api.resource("cks")
    api.resource("node")
    assert api.asked == asked


def test_paths_of_namespaced_and_cluster_wide_resources() -> None:
    assert CCP.path("team-a", "ccp-1") == "/apis/checkpointer.dev/v1alpha1/namespaces/team-a/containercheckpoints/ccp-1"
    assert CCP.path(None) == "/apis/checkpointer.dev/v1alpha1/containercheckpoints"  # every namespace
    assert CKS.path("default", "local") == "/apis/checkpointer.dev/v1alpha1/checkpointstorages/local"
    assert Resource("v1", "nodes", "Node", False).path(None, "node-a") == "/api/v1/nodes/node-a"
