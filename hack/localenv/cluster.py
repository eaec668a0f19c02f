"""What the e2e tests need of a cluster and its nodes, whichever environment provides them.

The local environment (LocalEnv, and kubelet.up_with_kubelets behind KubeletCluster) and a
kind cluster (hack/kind/up.sh, KindCluster) both give the tests these handles. `Cluster` and `Node`
are what the shared test helpers (tests/e2e/helpers.py, invariants, read_count) use; `ChartCluster` adds what
the Helm-installed user story needs (tests/e2e/test_helm_nodes.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


class Node(Protocol):
    """A node the tests run containers on, through its podman."""

    @property
    def name(self) -> str: ...

    @property
    def state_dir(self) -> Path:
        """The node's files as this side sees them (where a small spool of a fault test is mounted)."""
        ...

    @property
    def spool_dir(self) -> Path: ...

    def nsenter_argv(self) -> list[str]:
        """The command prefix that runs a command inside the node."""
        ...

    def podman(
        self,
        *args: str | os.PathLike[str],
        timeout: float = ...,
        check: bool = ...,
        input: bytes | None = ...,
    ) -> subprocess.CompletedProcess[bytes]: ...


class Storage(Protocol):
    """The S3 bucket the cluster's CheckpointStorage names, and a client of it for the tests."""

    @property
    def endpoint(self) -> str:
        """The S3 API's URL as the operator's Pods reach it (and the tests too)."""
        ...

    @property
    def bucket(self) -> str: ...

    @property
    def region(self) -> str: ...

    def client(self) -> S3Client: ...


class Cluster(Protocol):
    """A cluster with checkpointer's API, two nodes with podman and an S3 bucket."""

    @property
    def nodes(self) -> Mapping[str, Node]: ...

    @property
    def s3(self) -> Storage: ...

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> Any: ...

    def apply(self, *objects: dict[str, Any]) -> None: ...

    def read(self, kind: str, name: str, namespace: str = ...) -> dict[str, Any] | None:
        """The object, or None when there is none of that name."""
        ...

    def list_objects(self, kind: str, namespace: str | None = ..., field_selector: str = ...) -> list[dict[str, Any]]:
        """The objects of `kind` in `namespace` (None: every namespace), each with its kind."""
        ...

    def wait_phase(
        self, kind: str, name: str, phases: Sequence[str], namespace: str = ..., timeout: float = ...
    ) -> dict[str, Any]: ...

    def logs(self) -> str: ...


class ChartCluster(Cluster, Protocol):
    """A cluster whose nodes run a kubelet, the operator image loaded in every node, and nothing of
    the operator installed: `helm install` brings it. The release namespace (Pod Security
    privileged) and the S3 credentials Secret are there, as an admin makes them first."""

    @property
    def workdir(self) -> Path:
        """A directory of this side for the tests' files (values files, helm's state)."""
        ...

    def helm(self, *args: str | os.PathLike[str]) -> str:
        """helm against the cluster, in the release namespace."""
        ...

    def chart_values(self, storage: dict[str, object]) -> dict[str, object]:
        """The chart values these nodes need (image, podman mode, network) with `storage`."""
        ...

    def kubectl_as_node(self, node: str, *args: str) -> subprocess.CompletedProcess[str]:
        """kubectl with the credentials of `node`'s kubelet."""
        ...

    def runtime_rss_kib(self, node: str) -> dict[str, int]:
        """Resident memory of the node's kubelet and containerd, by process name."""
        ...

    def pod_logs(self) -> str:
        """The end of every Pod log the nodes keep, for a failed test's message."""
        ...

    def down(self) -> None: ...


def wait_phase(
    cluster: Cluster, kind: str, name: str, phases: Sequence[str], namespace: str = "default", timeout: float = 180
) -> dict[str, Any]:
    """The object once its status.phase is one of `phases`, asked through kubectl; fails with its last
    status and the logs."""
    deadline = time.monotonic() + timeout
    obj: dict[str, Any] = {}
    while time.monotonic() < deadline:
        out = cluster.kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
        if out.returncode == 0:
            obj = json.loads(out.stdout)
            if in_phase(obj, phases):
                return obj
        time.sleep(0.2)
    raise phase_not_reached(cluster, kind, name, phases, timeout, obj)


def in_phase(obj: dict[str, Any] | None, phases: Sequence[str]) -> bool:
    return obj is not None and (obj.get("status") or {}).get("phase") in phases


def phase_not_reached(
    cluster: Cluster, kind: str, name: str, phases: Sequence[str], timeout: float, obj: dict[str, Any] | None
) -> AssertionError:
    return AssertionError(
        f"{kind}/{name} did not reach {phases} in {timeout}s; last status "
        f"{json.dumps((obj or {}).get('status'), indent=1)}\n{cluster.logs()}"
    )


def kubectl_read(cluster: Cluster, kind: str, name: str, namespace: str = "default") -> dict[str, Any] | None:
    """`Cluster.read` through kubectl, for clusters the tests have no client of their own for."""
    out = cluster.kubectl("get", kind, name, "-n", namespace, "-o", "json", "--ignore-not-found")
    found: dict[str, Any] | None = json.loads(out.stdout) if out.stdout.strip() else None
    return found


def kubectl_list(
    cluster: Cluster, kind: str, namespace: str | None = None, field_selector: str = ""
) -> list[dict[str, Any]]:
    """`Cluster.list_objects` through kubectl."""
    where = ["-n", namespace] if namespace else ["--all-namespaces"]
    selector = [f"--field-selector={field_selector}"] if field_selector else []
    items: list[dict[str, Any]] = json.loads(cluster.kubectl("get", kind, *where, *selector, "-o", "json").stdout)[
        "items"
    ]
    return items
