"""The node's CRI runtime from the agent's side (adapters/cri.py), on the local nodes with a kubelet.

One environment for the file (kubelet.running) with the operator installed by Helm alone. Each
agent's Pod reaches its node's containerd through the socket directory the chart mounts
(`cri.socketPath`), records the runtime on its Lease, and has containerd write a running Pod
container's checkpoint into its spool: the chart's state directory, at one path on the node (where
containerd runs) and in the agent's Pod. The tar is containerd's own (CRIU's images under
`checkpoint/`, `config.dump`, `spec.dump`, `status.dump`, the root file system's changes), and the
container keeps running. containerd 2.1 writes that tar with one sequential copy into the path it
is given, so the path may also be a FIFO the agent reads as it is written.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import get_pod, install_release, pod_count, release_pods, release_values, run_pod, unique, until
from localenv import kubelet
from localenv.env import NAMESPACE
from localenv.kubelet import KubeletCluster
from localenv.procs import require

pytestmark = pytest.mark.e2e
NODE = "node-a"
# What containerd 2.1 puts into every checkpoint archive beside CRIU's images.
CONTAINERD_MEMBERS = {"config.dump", "spec.dump", "status.dump", "rootfs-diff.tar"}

# Run by the agent's own interpreter in its Pod: its settings (CHECKPOINTER_CRI_SOCKET, the spool) from
# its environment, the adapter as the agent's services call it. With "fifo" the location is a FIFO
# (CriRuntime.checkpoint_streamed) whose bytes are read as a tar stream while containerd writes them.
AGENT_CHECKPOINT = r"""
import io, json, sys, tarfile, time
from checkpointer.adapters.cri import CriRuntime
from checkpointer.errors import Failure, Retry
from checkpointer.settings import Settings

settings = Settings()
container, name, fifo = sys.argv[1], sys.argv[2], sys.argv[3] == "fifo"
runtime = CriRuntime(settings.cri_socket)
started = time.monotonic()
read = {}


class Chunks(io.RawIOBase):
    def __init__(self, chunks):
        self.chunks, self.rest = iter(chunks), b""

    def readable(self):
        return True

    def readinto(self, buffer):
        while not self.rest:
            self.rest = bytes(next(self.chunks, b"")) or None
            if self.rest is None:
                return 0
        n = min(len(buffer), len(self.rest))
        buffer[:n], self.rest = self.rest[:n], self.rest[n:]
        return n


def export(chunks):
    with tarfile.open(fileobj=io.BufferedReader(Chunks(chunks)), mode="r|") as tar:
        read["members"] = [member.name for member in tar]
    read["ended"] = time.monotonic() - started


try:
    if fifo:
        runtime.checkpoint_streamed(container, settings.spool_dir / name, 120, export)
    else:
        runtime.checkpoint(container, settings.spool_dir / name, 120)
except (Failure, Retry) as e:
    read |= {"reason": str(e.reason), "message": e.message}
read["returned"] = time.monotonic() - started
print(json.dumps(read))
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeletCluster]:
    missing = kubelet.missing()
    require(not missing, missing)
    # Down, it fails if any process, cgroup or mount of its nodes is left, or the machine's network changed.
    with kubelet.running(Path(tmp_path_factory.mktemp("cri-runtime"))) as env:
        install_release(env, release_values(env))
        yield env


def spool(env: KubeletCluster, node: str) -> Path:
    """The agent's spool (the chart's /var/lib/checkpointer/spool on the node) as the machine sees it."""
    return env.nodes[node].state_dir / "checkpointer" / "spool"


def runtime_facts(env: KubeletCluster, node: str) -> dict[str, str]:
    """The CRI runtime the node's agent recorded on its Lease, once it has."""

    def recorded() -> dict[str, str] | None:
        lease = f"checkpointer-agent-{node}"
        out = env.kubectl("get", "lease", "-n", NAMESPACE, lease, "-o", "jsonpath={.metadata.annotations}")
        annotations: dict[str, str] = json.loads(out.stdout or "{}")
        facts = {k.removeprefix("checkpointer.dev/"): v for k, v in annotations.items() if "/cri-" in k}
        return facts if "cri-runtime" in facts else None

    found: dict[str, str] = until(f"the runtime on the Lease of {node}", recorded, timeout=60)
    return found


def agent_checkpoint(env: KubeletCluster, node: str, container: str, name: str, how: str) -> dict[str, Any]:
    """The adapter's checkpoint run in the node's agent Pod, by `kubectl exec`: what it read and when."""
    (agent,) = [p for p in release_pods(env, "agent") if p["spec"]["nodeName"] == node]
    pod = agent["metadata"]["name"]
    out = env.kubectl("exec", "-n", NAMESPACE, pod, "--", "python", "-c", AGENT_CHECKPOINT, container, name, how)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def container_id(pod: dict[str, Any]) -> str:
    (status,) = pod["status"]["containerStatuses"]
    runtime, _, found = str(status["containerID"]).partition("://")
    assert runtime == "containerd", status
    return found


def assert_counts_on(env: KubeletCluster, name: str, since: int) -> None:
    """The Pod's container runs on where it was: no restart, and its count goes past `since`."""
    until(f"{name} counting on from {since}", lambda: pod_count(env, name) > since, timeout=15)
    (status,) = get_pod(env, name)["status"]["containerStatuses"]
    assert status["restartCount"] == 0 and "running" in status["state"], status


def test_each_agent_records_its_nodes_runtime_on_its_lease(cluster: KubeletCluster) -> None:
    for node in cluster.nodes:
        facts = runtime_facts(cluster, node)
        out = cluster.kubectl("get", "node", node, "-o", "jsonpath={.status.nodeInfo.containerRuntimeVersion}")
        runtime, _, version = out.stdout.partition("://")  # the kubelet's word: containerd://2.1.9
        assert facts["cri-runtime"] == runtime == "containerd", facts
        assert facts["cri-version"].removeprefix("v") == version.removeprefix("v"), (facts, out.stdout)
        assert facts["cri-api-version"] == "v1"
        # containerd has CRIU (the node's, in its PATH) and CheckpointContainer: it would checkpoint.
        assert facts["cri-checkpoint"] == "true" and facts["cri-checkpoint-refusal"] == "", facts
        # Asked with a container that does not exist: nothing was written.
        assert not (spool(cluster, node) / ".cri-probe.tar").exists()


def test_the_agent_has_containerd_checkpoint_a_running_pod_container_into_its_spool(cluster: KubeletCluster) -> None:
    env = cluster
    name = unique("counter")
    container = container_id(run_pod(env, NODE, name))
    before = pod_count(env, name)

    result = agent_checkpoint(env, NODE, container, f"{name}.tar", "file")
    assert "reason" not in result, result
    archive = spool(env, NODE) / f"{name}.tar"
    try:
        with tarfile.open(archive) as tar:
            names = tar.getnames()
            config = json.load(tar.extractfile("config.dump"))  # type: ignore[arg-type]
            spec = json.load(tar.extractfile("spec.dump"))  # type: ignore[arg-type]
        assert set(names) >= CONTAINERD_MEMBERS, names
        assert "checkpoint/inventory.img" in names and any(n.startswith("checkpoint/pages-") for n in names), names
        # containerd's own description of the container, and its OCI spec: the counter's shell.
        assert config["id"] == container, config
        assert config["rootfsImageRef"].startswith("sha256:") or "@sha256:" in config["rootfsImageRef"], config
        assert spec["process"]["args"] == ["/bin/counter"], spec["process"]
    finally:
        archive.unlink(missing_ok=True)
    assert_counts_on(env, name, before)
    # The kubelet's checkpoint API was not used: nothing of it on the node.
    assert not list((env.nodes[NODE].state_dir / "kubelet").glob("checkpoints/*"))
    env.kubectl("delete", "pod", name, "--wait=false")


def test_containerd_writes_the_tar_into_a_fifo_as_it_goes(cluster: KubeletCluster) -> None:
    env = cluster
    name = unique("counter")
    container = container_id(run_pod(env, NODE, name))
    before = pod_count(env, name)

    result = agent_checkpoint(env, NODE, container, f"{name}.fifo", "fifo")
    assert "reason" not in result, result
    # Read whole as a tar stream, to its end, before containerd's answer was read.
    assert set(result["members"]) >= CONTAINERD_MEMBERS, result
    assert "checkpoint/inventory.img" in result["members"], result
    assert result["ended"] <= result["returned"], result
    assert not list(spool(env, NODE).glob(f"{name}*"))
    assert_counts_on(env, name, before)
    env.kubectl("delete", "pod", name, "--wait=false")


def test_a_container_the_runtime_does_not_have_fails_for_good(cluster: KubeletCluster) -> None:
    result = agent_checkpoint(cluster, NODE, "0" * 64, f"{unique('absent')}.tar", "file")
    assert result["reason"] == "ContainerNotFound", result
    assert not list(spool(cluster, NODE).glob("absent*"))
