"""A Pod's checkpoint (spec.podRef): which node takes it, which containers, and what refuses it.

The controller resolves the Pod's node (services/pods.pod_node); the agent of that node reads the Pod
again and takes its containers' runtime ids from its status (pod_containers); an agent acts on a
checkpoint that names no node only where status.nodeName, which tenants cannot write, says.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Callable, Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from checkpointer import NODE_LABEL
from checkpointer.adapters.kube import Kube
from checkpointer.agent import elsewhere
from checkpointer.archive import manifest
from checkpointer.archive.codec import ConfigurationTap
from checkpointer.archive.workfolder import Target, WorkFolder
from checkpointer.errors import Failure, Retry
from checkpointer.models import CheckpointSpec, CheckpointStorage, ContainerCheckpoint, node_of
from checkpointer.reasons import Reason
from checkpointer.services.capabilities import CriFacts
from checkpointer.services.checkpoint import Checkpoint
from checkpointer.services.node import Node
from checkpointer.services.pods import pod_containers, pod_node, pod_record
from checkpointer.services.scheduling import AgentLeases, schedule_checkpoint
from checkpointer.status import StatusWriter

DIGEST = "127.0.0.1:5000/checkpointer/counter@sha256:" + "a" * 64


def pod(
    node: str = "node-a", phase: str = "Running", containers: tuple[str, ...] = ("counter", "sidecar"), **extra: Any
) -> dict[str, Any]:
    return {
        "metadata": {"name": "counter", "namespace": "team-a", "uid": "pod-uid", "labels": {"app": "counter"}},
        "spec": {"nodeName": node, "containers": [{"name": c, "image": f"{c}:1"} for c in containers]},
        "status": {
            "phase": phase,
            "containerStatuses": [
                {
                    "name": c,
                    "containerID": f"containerd://{c}-id",
                    "imageID": DIGEST,
                    "state": {"running": {"startedAt": "2026-12-07T00:00:00Z"}},
                }
                for c in containers
            ],
        },
        **extra,
    }


def spec(**fields: Any) -> CheckpointSpec:
    return CheckpointSpec.model_validate({"podRef": {"name": "counter"}, "export": {}, **fields})


def reason(call: Any) -> Reason:
    with pytest.raises(Failure) as caught:
        call()
    return caught.value.reason


def test_the_controller_takes_the_pods_node_when_none_is_named() -> None:
    assert pod_node(spec(), "team-a", pod()) == "node-a"
    assert pod_node(spec(nodeName="node-a"), "team-a", pod()) == "node-a"


def test_a_pod_the_namespace_does_not_have_is_not_found() -> None:
    with pytest.raises(Failure) as caught:
        pod_node(spec(), "team-a", None)
    assert caught.value.reason == Reason.POD_NOT_FOUND
    assert "namespace team-a" in caught.value.message


def test_a_named_node_must_be_the_pods() -> None:
    with pytest.raises(Failure) as caught:
        pod_node(spec(nodeName="node-b"), "team-a", pod())
    assert caught.value.reason == Reason.POD_ON_ANOTHER_NODE
    assert "'node-a'" in caught.value.message and "'node-b'" in caught.value.message


def test_a_pod_that_does_not_run_is_refused() -> None:
    assert reason(lambda: pod_node(spec(), "team-a", pod(phase="Pending"))) == Reason.POD_NOT_RUNNING
    assert reason(lambda: pod_node(spec(), "team-a", pod(node=""))) == Reason.POD_NOT_RUNNING
    deleting = pod()
    deleting["metadata"]["deletionTimestamp"] = "2026-12-07T00:00:00Z"
    assert reason(lambda: pod_node(spec(), "team-a", deleting)) == Reason.POD_NOT_RUNNING


def test_a_container_the_pod_lacks_is_refused_naming_the_pods_containers() -> None:
    with pytest.raises(Failure) as caught:
        pod_node(spec(podRef={"name": "counter", "containers": ["web"]}), "team-a", pod())
    assert caught.value.reason == Reason.CONTAINER_NOT_IN_POD
    assert "'web'" in caught.value.message and "counter, sidecar" in caught.value.message


def test_the_agent_takes_runtime_ids_and_image_digests_from_the_pods_status() -> None:
    found = pod_containers(spec(), pod(), "node-a")
    assert [(c.name, c.id, c.image, c.image_id) for c in found] == [
        ("counter", "counter-id", "counter:1", DIGEST),
        ("sidecar", "sidecar-id", "sidecar:1", DIGEST),
    ]
    chosen = pod_containers(spec(podRef={"name": "counter", "containers": ["sidecar"]}), pod(), "node-a")
    assert [c.name for c in chosen] == ["sidecar"]


def test_a_pod_gone_or_made_anew_on_another_node_is_not_the_agents() -> None:
    assert reason(lambda: pod_containers(spec(), None, "node-a")) == Reason.POD_NOT_FOUND
    assert reason(lambda: pod_containers(spec(), pod(node="node-b"), "node-a")) == Reason.POD_NOT_FOUND


def test_a_container_without_a_running_state_is_refused() -> None:
    waiting = pod()
    waiting["status"]["containerStatuses"][1]["state"] = {"waiting": {"reason": "CrashLoopBackOff"}}
    with pytest.raises(Failure) as caught:
        pod_containers(spec(), waiting, "node-a")
    assert caught.value.reason == Reason.CONTAINER_NOT_RUNNING
    assert "sidecar" in caught.value.message


def test_the_manifest_keeps_the_pods_spec() -> None:
    record = pod_record(pod())
    assert record["name"] == "counter" and record["uid"] == "pod-uid"
    assert record["spec"]["containers"][0]["image"] == "counter:1"


def checkpoint_body(spec_: dict[str, Any], status_node: str | None, label: str | None) -> dict[str, Any]:
    labels = {NODE_LABEL: label} if label else {}
    status = {"phase": "Scheduled", **({"nodeName": status_node} if status_node else {})}
    meta = {"name": "c", "namespace": "team-a", "uid": "u", "labels": labels}
    return {"kind": "ContainerCheckpoint", "metadata": meta, "spec": spec_, "status": status}


def test_a_pods_checkpoint_without_a_node_is_the_agents_whose_node_the_controller_recorded() -> None:
    pod_spec = {"podRef": {"name": "counter"}, "export": {}}
    assert elsewhere(checkpoint_body(pod_spec, "node-a", "node-a"), "node-a") is None
    assert elsewhere(checkpoint_body(pod_spec, "node-a", "node-a"), "node-b") is not None
    # Not yet scheduled, or relabelled by its tenant: no agent acts on the label alone.
    assert elsewhere(checkpoint_body(pod_spec, None, "node-a"), "node-a") is not None
    assert elsewhere(checkpoint_body(pod_spec, "node-a", "node-b"), "node-b") is not None
    # status.nodeName counts only for a Pod's checkpoint: a podman one's node is its spec's.
    assert node_of(checkpoint_body({"containers": ["web"]}, "node-a", "node-a")) == ""


def test_the_manifest_names_the_node_the_pod_ran_on() -> None:
    ccp = ContainerCheckpoint.model_validate(
        checkpoint_body({"podRef": {"name": "counter"}, "export": {}}, "node-a", "node-a")
    )
    document = manifest.Manifest.of(ccp, [], {"node": "node-a"}, "t0", "t1").document()
    assert document["nodeName"] == "node-a"
    assert "nodeName" not in document["flags"]


# --- the agent's side: the runtime's tar ---------------------------------------------------------


class Runtime:
    """A node's container runtime that streams a small checkpoint tar, or fails as told."""

    def __init__(self, fails: Exception | None = None) -> None:
        self.fails = fails
        self.asked: list[tuple[str, Path, int]] = []

    def checkpoint_streamed(
        self, container_id: str, fifo: Path, timeout_seconds: int, export: Callable[[Iterable[bytes]], None]
    ) -> None:
        self.asked.append((container_id, fifo, timeout_seconds))
        if self.fails is not None:
            raise self.fails
        raw = checkpoint_tar(tarfile.PAX_FORMAT, long_names=False)
        export(raw[i : i + 1000] for i in range(0, len(raw), 1000))


def pod_job(tmp_path: Path, runtime: Runtime) -> Checkpoint:
    ccp = ContainerCheckpoint.model_validate(
        checkpoint_body({"podRef": {"name": "counter"}, "export": {}}, "node-a", "node-a")
    )
    settings = SimpleNamespace(node_name="node-a", cri_checkpoint_timeout_seconds=3600)
    agent = SimpleNamespace(cri=runtime, settings=settings)
    folder = WorkFolder.of(tmp_path, "checkpoint", ccp.metadata)
    return Checkpoint(cast(Node, agent), ccp, cast(StatusWriter, None), folder)


def test_the_runtimes_tar_streams_through_write_and_its_configuration_is_kept(tmp_path: Path) -> None:
    runtime = Runtime()
    job = pod_job(tmp_path, runtime)
    target = Target("counter", "c" * 64)
    written = bytearray()

    def write(chunks: Iterable[bytes | memoryview]) -> None:
        for chunk in chunks:
            written.extend(chunk)

    assert job.runtime_checkpoint(target, write) == {}
    [(container_id, fifo, timeout)] = runtime.asked
    assert container_id == "c" * 64 and fifo.parent == job.folder.path and timeout == 3600
    assert bytes(written) == checkpoint_tar(tarfile.PAX_FORMAT, long_names=False)
    configuration = job.configuration(target)
    assert configuration.config_dump == hashlib.sha256(b'{"id":"c"}').hexdigest()
    assert configuration.spec_dump == hashlib.sha256(b'{"ociVersion":"1.2.0"}').hexdigest()


def test_a_runtime_that_fails_fails_the_checkpoint_and_the_container_runs_on(tmp_path: Path) -> None:
    for error in (Failure(Reason.CHECKPOINT_FAILED, "criu failed"), Retry(Reason.RUNTIME_UNAVAILABLE, "no answer")):
        job = pod_job(tmp_path, Runtime(fails=error))
        target = Target("counter", "c" * 64)
        with pytest.raises(Failure) as caught:
            job.runtime_checkpoint(target, lambda chunks: None)
        assert caught.value.reason == error.reason
        assert "the container runtime could not checkpoint counter" in caught.value.message
        given = job.give_back(target, Reason.CHECKPOINT_FAILED, "it failed", None, "")
        assert given.message == "it failed; counter kept running (a Pod's container is never stopped)"


def test_a_fifo_a_killed_agent_left_is_drained_when_the_checkpoint_is_given_up(tmp_path: Path) -> None:
    job = pod_job(tmp_path, Runtime())
    target = Target("counter", "c" * 64)
    job.folder.create()
    os.mkfifo(job.runtime_fifo(target))
    job.give_back(target, Reason.CHECKPOINT_INTERRUPTED, "the agent restarted", None, "")
    assert not job.runtime_fifo(target).exists()


def test_an_agent_without_a_runtime_socket_cannot_checkpoint_a_pod(tmp_path: Path) -> None:
    job = pod_job(tmp_path, Runtime())
    job.node.cri = None
    with pytest.raises(Failure) as caught:
        job.runtime_checkpoint(Target("counter", "c" * 64), lambda chunks: None)
    assert caught.value.reason == Reason.RUNTIME_CANNOT_CHECKPOINT


class Leases:
    """The Lease annotations of node-a's agent, and its Lease alive."""

    namespace = "checkpointer-system"

    def __init__(self, annotations: dict[str, str]) -> None:
        self.annotations = annotations

    def alive(self, node: str) -> bool:
        return True

    def lease_annotations(self, namespace: str, name: str) -> dict[str, str]:
        assert name == "checkpointer-agent-node-a"
        return self.annotations


class Cluster(Leases):
    def pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        return pod() if (namespace, name) == ("team-a", "counter") else None

    def storages(self) -> list[Any]:
        return [
            CheckpointStorage.model_validate(
                {"metadata": {"name": "s"}, "spec": {"bucket": "b", "default": True}, "status": {"phase": "Available"}}
            )
        ]


def test_the_controller_refuses_up_front_a_node_whose_runtime_cannot_checkpoint() -> None:
    ccp = ContainerCheckpoint.model_validate(checkpoint_body({"podRef": {"name": "counter"}, "export": {}}, None, None))
    unable = CriFacts(
        "containerd", "v1.6.0", "v1", checkpoint=False, refusal="method CheckpointContainer not implemented"
    )
    cluster = Cluster(unable.annotations())
    with pytest.raises(Failure) as caught:
        schedule_checkpoint(cast(Kube, cluster), cast(AgentLeases, cluster), ccp, frozenset())
    assert caught.value.reason == Reason.RUNTIME_CANNOT_CHECKPOINT
    assert "containerd v1.6.0" in caught.value.message and "not implemented" in caught.value.message
    able = Cluster(CriFacts("containerd", "v2.1.9", "v1", checkpoint=True).annotations())
    assert schedule_checkpoint(cast(Kube, able), cast(AgentLeases, able), ccp, frozenset()) == ("node-a", "s")
    # Nothing recorded (an older agent, or one still asking): the agent's own call says why.
    unknown = Cluster({})
    assert schedule_checkpoint(cast(Kube, unknown), cast(AgentLeases, unknown), ccp, frozenset())[0] == "node-a"


def checkpoint_tar(fmt: int, long_names: bool) -> bytes:
    """A runtime's checkpoint tar: pages, then config.dump and spec.dump (behind long paths' headers)."""
    out = io.BytesIO()
    prefix = "./" + "d" * 120 + "/../" if long_names else ""
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for name, data in (
            ("checkpoint/pages-1.img", b"p" * 5000),
            (f"{prefix}config.dump", b'{"id":"c"}'),
            ("empty", b""),
            (f"{prefix}spec.dump", b'{"ociVersion":"1.2.0"}'),
            ("rootfs-diff.tar", b"r" * 1025),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("long_names", [False, True])
@pytest.mark.parametrize("piece", [1, 511, 512, 4096, 1 << 20])
def test_the_configuration_is_kept_from_a_tar_streaming_past(fmt: int, long_names: bool, piece: int) -> None:
    if fmt == tarfile.USTAR_FORMAT and long_names:
        return  # ustar has no room for them: the runtimes write pax
    raw = checkpoint_tar(fmt, long_names)
    tap = ConfigurationTap()
    passed = b"".join(bytes(c) for c in tap.tap(raw[i : i + piece] for i in range(0, len(raw), piece)))
    assert passed == raw
    assert tap.files == {"config.dump": b'{"id":"c"}', "spec.dump": b'{"ociVersion":"1.2.0"}'}


def test_a_stream_that_is_no_tar_passes_unchanged_and_keeps_nothing() -> None:
    tap = ConfigurationTap()
    junk = [b"\xff" * 700, b"x" * 3000]
    assert list(tap.tap(junk)) == junk
    assert tap.files == {}
