"""The operator installed by Helm alone, on nodes with a kubelet (docs/local-environment.md).

The same tests run on either cluster (localenv.cluster.ChartCluster):
- by default the local environment's own (kubelet.up_with_kubelets): containerd and a
  kubelet beside each node's podman, kube-scheduler beside the control plane;
- with `pytest --cluster kind`, the kind cluster hack/kind/up.sh made (localenv.kind).
No agent or controller is started by the harness. The chart's Deployment and DaemonSet run as a
cluster admin's `helm install` runs them, with kubelet-projected tokens; the user story then runs
through them: checkpoint a counter on one node, restore it on the other, upgrade the release with a
checkpoint in flight, uninstall.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import (
    apply,
    assert_stored_as_reported,
    checkpoint_counter,
    describe_release,
    install_release,
    lease_holder,
    release_pods,
    release_values,
    restore,
    unique,
    until,
    wait_rolled_out,
    workload,
)
from invariants import Container, check_invariants
from localenv import kubelet
from localenv.chart import CHART, RELEASE
from localenv.cluster import ChartCluster
from localenv.env import STORAGE
from localenv.images import read_count
from localenv.procs import LocalEnvError, require

pytestmark = pytest.mark.e2e
UPLOAD_BYTES_PER_SECOND = 8 * 2**20


@pytest.fixture(scope="module")
def helm_env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChartCluster]:
    if request.config.getoption("--cluster") == "kind":
        from localenv.kind import KindCluster

        try:
            cluster = KindCluster.connect(Path(tmp_path_factory.mktemp("kind")))
        except LocalEnvError as err:
            problem = str(err)
        else:
            yield cluster
            return
        # Asked for kind and there is none: an error wherever it runs, never a skip.
        pytest.fail(f"--cluster kind: {problem}", pytrace=False)
    missing = kubelet.missing()
    require(not missing, missing)
    # Down, it fails if any process, cgroup or mount of its nodes is left, or the machine's network changed.
    with kubelet.running(Path(tmp_path_factory.mktemp("kubelet-env"))) as local:
        yield local


def running_and_ready(obj: dict[str, Any]) -> bool:
    """A Pod Running and Ready, or a Node Ready."""
    status = obj.get("status") or {}
    conditions = status.get("conditions") or []
    is_ready = any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
    return is_ready and (obj.get("kind") == "Node" or status.get("phase") == "Running")


@pytest.fixture(scope="module")
def installed(helm_env: ChartCluster) -> ChartCluster:
    # Slow uploads, so that a checkpoint is still uploading while an upgrade rolls the agents.
    install_release(helm_env, release_values(helm_env, upload__bytesPerSecond=UPLOAD_BYTES_PER_SECOND))
    return helm_env


def source_and_target(env: ChartCluster) -> tuple[str, str]:
    """The two nodes, by name: node-a and node-b here, kind's two workers there."""
    source, target = sorted(env.nodes)
    return source, target


def test_nodes_register_with_their_own_certificates_and_are_ready(helm_env: ChartCluster) -> None:
    server = json.loads(helm_env.kubectl("version", "-o", "json").stdout)["serverVersion"]["gitVersion"]
    for name in helm_env.nodes:
        node = json.loads(helm_env.kubectl("get", "node", name, "-o", "json").stdout)
        assert running_and_ready(node), node["status"].get("conditions")
        # The kubelet is of the control plane's version (built from the same module here).
        assert node["status"]["nodeInfo"]["kubeletVersion"] == server
        assert node["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://2.1")
        # NodeRestriction: a kubelet may not touch another node.
        other = next(n for n in helm_env.nodes if n != name)
        denied = helm_env.kubectl_as_node(name, "label", "node", other, "touched=yes")
        assert denied.returncode != 0 and "forbidden" in denied.stderr.lower(), denied.stderr


def test_helm_install_runs_the_chart_pods_on_both_nodes(installed: ChartCluster) -> None:
    env = installed
    agents = release_pods(env, "agent")
    assert sorted(p["spec"]["nodeName"] for p in agents) == sorted(env.nodes), describe_release(env)
    controllers = release_pods(env, "controller")
    assert len(controllers) == 2 and all(running_and_ready(p) for p in agents + controllers), describe_release(env)
    for pod in agents + controllers:
        # The token is the kubelet's: a projected serviceAccountToken volume, mounted in the container.
        projected = [v for v in pod["spec"]["volumes"] if "projected" in v]
        sources = [s for v in projected for s in v["projected"]["sources"]]
        assert any("serviceAccountToken" in s for s in sources), pod["spec"]["volumes"]
        # The probe reached the container: Ready needs the liveness endpoint (restartCount stays 0).
        assert pod["status"]["containerStatuses"][0]["restartCount"] == 0, describe_release(env)
    # The agents' writes pass the chart's admission policy, which needs the node claim of their tokens.
    assert all(lease_holder(env, node) == node for node in env.nodes)
    # A node's kubelet and containerd (without the Pods' shims) stay small next to everything else.
    for node in env.nodes:
        rss = env.runtime_rss_kib(node)
        assert set(rss) == {"kubelet", "containerd"} and sum(rss.values()) < 384 * 1024, rss


def test_counter_moves_from_node_a_to_node_b(installed: ChartCluster) -> None:
    env = installed
    source, target = source_and_target(env)
    try:
        container, name, counted, archive = checkpoint_counter(env, source)
    except AssertionError as err:
        raise AssertionError(f"{err}\n{describe_release(env)}") from err
    assert_stored_as_reported(env, archive)
    status = restore(env, target, {"checkpointRef": {"name": name}})["status"]
    assert status["phase"] == "Succeeded", f"{status}\n{describe_release(env)}"
    time.sleep(1)
    assert read_count(env.nodes[target], container) > counted
    env.nodes[target].podman("rm", "-f", container)


def test_upgrade_rolls_the_agents_and_a_checkpoint_in_flight_ends(installed: ChartCluster) -> None:
    env = installed
    source, _ = source_and_target(env)
    before = {p["metadata"]["name"] for p in release_pods(env, "agent")}
    # Incompressible: about 12 s of upload at the first release's rate.
    container = workload(env, source, mib=96)
    name = unique("ccp")
    apply(env, "ContainerCheckpoint", name, {"nodeName": source, "containers": [container], "export": {}})
    phase = env.wait_phase("ccp", name, ["Uploading", "Succeeded", "Failed"], timeout=60)["status"]["phase"]
    assert phase == "Uploading", "the checkpoint is in flight when the upgrade begins"
    # The changed value: no upload cap. It is in the agent's environment, so every agent Pod is replaced.
    env.helm(
        "upgrade",
        RELEASE,
        CHART,
        "--values",
        release_values(env, upload__bytesPerSecond=0),
        "--wait",
        "--timeout",
        "5m",
    )
    wait_rolled_out(env)
    after = release_pods(env, "agent")
    assert not before & {p["metadata"]["name"] for p in after}, "every agent Pod was replaced"
    assert all(
        e["value"] == "0"
        for p in after
        for e in p["spec"]["containers"][0]["env"]
        if e["name"] == "CHECKPOINTER_UPLOAD_BYTES_PER_SECOND"
    )
    status = env.wait_phase("ccp", name, ["Succeeded", "Failed"], timeout=300)["status"]
    # The old agent gave the upload up on SIGTERM with its archive spooled; the new one resumes it.
    assert status["phase"] == "Succeeded", f"{status}\n{describe_release(env)}"
    assert_stored_as_reported(env, status["archives"][0])
    check_invariants(env, stopped=[Container(source, container)])


def test_uninstall_leaves_no_pods_and_keeps_the_crds(installed: ChartCluster) -> None:
    env = installed
    env.helm("uninstall", RELEASE, "--wait", "--timeout", "5m")
    until(
        "no Pods left",
        lambda: not (release_pods(env, "agent") + release_pods(env, "controller")),
        timeout=120,
        last=lambda: describe_release(env),
    )
    crds = env.kubectl("get", "crd", "-o", "name").stdout.split()
    assert {c for c in crds if c.endswith(".checkpointer.dev")}, crds
    # The chart's storage stays too (helm.sh/resource-policy: keep), not stuck in deletion.
    storage = json.loads(env.kubectl("get", "cks", STORAGE, "-o", "json").stdout)
    assert "deletionTimestamp" not in storage["metadata"]
