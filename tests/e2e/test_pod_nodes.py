"""Pods as a real cluster runs them, on the local environment's nodes with a kubelet.

The environment (kubelet.up_with_kubelets, docs/local-environment.md) starts an OCI registry and
pushes its images there; each node's containerd pulls from it. A Pod without hostNetwork gets a
network namespace of its own (loopback, and an eth0 that leads nowhere). The Pods that checkpointer
checkpoints through a node's runtime are of this kind.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import pod_count, run_pod, unique, until
from localenv import kubelet
from localenv.images import COUNTER
from localenv.kubelet import KubeletCluster
from localenv.procs import require

pytestmark = pytest.mark.e2e
NODE = "node-a"


@pytest.fixture(scope="module")
def pod_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeletCluster]:
    missing = kubelet.missing()
    require(not missing, missing)
    # Down, it fails if any process, cgroup or mount of its nodes is left, or the machine's network changed.
    with kubelet.running(Path(tmp_path_factory.mktemp("pod-nodes"))) as cluster:
        yield cluster


def test_counter_pod_with_its_own_network_runs_from_the_registry(pod_nodes: KubeletCluster) -> None:
    env = pod_nodes
    name = unique("counter")
    started = run_pod(env, NODE, name)
    image = env.registry.reference(COUNTER)
    status = started["status"]
    assert started["spec"]["nodeName"] == NODE
    assert not started["spec"].get("hostNetwork")

    # Pulled from the registry: the image ID is the repository digest of the manifest pushed there.
    digest = env.registry.manifest_digest(image)
    (container,) = status["containerStatuses"]
    assert container["imageID"] == f"{env.registry.host}/checkpointer/counter@{digest}", container

    # A network namespace of its own, with an address of the node's Pod range, not the node's.
    assert status["podIP"] != status["hostIP"]
    assert ipaddress.ip_address(status["podIP"]) in ipaddress.ip_network(env.pod_subnet(NODE)), status
    namespace = env.kubectl("exec", name, "--", "ls", "-l", "/proc/self/ns/net").stdout
    assert os.readlink("/proc/self/ns/net") not in namespace, namespace
    devices = env.kubectl("exec", name, "--", "cat", "/proc/net/dev").stdout.splitlines()[2:]
    assert sorted(line.split(":")[0].strip() for line in devices) == ["eth0", "lo"], devices

    # The count goes on.
    first = pod_count(env, name)
    until(f"{name} counting on from {first}", lambda: pod_count(env, name) > first, timeout=10)
    logs = env.kubectl("logs", name, "--tail=1").stdout.strip()
    assert int(logs) > first

    # Gone, the Pod gives its address back: nothing of it piles up in the node's CNI state.
    env.kubectl("delete", "pod", name, "--wait=true", "--timeout=60s")
    leases = env.nodes[NODE].state_dir / "cni-state" / "networks" / kubelet.POD_NETWORK
    assert status["podIP"] not in {p.name for p in leases.iterdir()}
